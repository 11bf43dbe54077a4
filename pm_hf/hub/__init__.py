"""The Hub side: the repository, an export folder, its model card and where its base model comes from."""
