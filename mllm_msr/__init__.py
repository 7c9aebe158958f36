"""mllm-msr: multimodal sequential recommendation with (M)LLMs."""
__version__ = "0.1.0"
