"""iqa: image quality assessment with multimodal LLMs, as a batch command-line tool."""

__version__ = "0.1.0"
