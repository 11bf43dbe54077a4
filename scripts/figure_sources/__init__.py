"""What scripts/doc_figures.py writes into each block: the helpers over results/ (`common`), the accuracy suites'
figures (`suites`), the LLM track's (`llm`), the cost and memory figures (`cost`)."""
