"""mllm_msr/evaluation"""
