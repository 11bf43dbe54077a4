"""Task streams from Hugging Face datasets: sources, class splits, images, instruction pairs."""
