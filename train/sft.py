"""Supervised fine-tuning on the gold answers (and the harmful prompts' refusals).

Usage:
    accelerate launch [--config_file accelerate_configs/single_gpu.yaml] train/sft.py --config recipes/qwen2.5-coder-0.5b/sft.yaml [--key value ...]
    python train/sft.py --config recipes/tiny/sft.yaml --max_steps 2 --output_dir outputs/tiny-sft
"""

import sys

from deccp.training import main

if __name__ == "__main__":
    sys.exit(main("sft"))
