"""DPO: prefer the gold answers over CCP-style (or mined) answers; refusals kept for harmful prompts.

Usage:
    accelerate launch [--config_file accelerate_configs/single_gpu.yaml] train/dpo.py --config recipes/qwen2.5-coder-0.5b/dpo.yaml [--key value ...]
    python train/dpo.py --config recipes/tiny/dpo.yaml --max_steps 2 --output_dir outputs/tiny-dpo
"""

import sys

from deccp.training import main

if __name__ == "__main__":
    sys.exit(main("dpo"))
