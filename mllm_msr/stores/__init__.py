"""mllm_msr/stores"""
