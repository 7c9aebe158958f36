"""mllm_msr/data"""
