"""KTO: gold answers desirable, CCP-style (or mined) answers undesirable; refusals kept for harmful prompts.

Usage:
    accelerate launch [--config_file accelerate_configs/single_gpu.yaml] train/kto.py --config recipes/qwen2.5-coder-0.5b/kto.yaml [--key value ...]
    python train/kto.py --config recipes/tiny/kto.yaml --max_steps 2 --output_dir outputs/tiny-kto
"""

import sys

from deccp.training import main

if __name__ == "__main__":
    sys.exit(main("kto"))
