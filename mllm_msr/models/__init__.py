"""mllm_msr/models"""
