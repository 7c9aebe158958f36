"""``python -m mllm_msr.cli ...`` = ``msr ...``."""
from mllm_msr.cli import main

main()
