"""Remove the censorship-refusal direction from a model's weights.

Usage:
    python train/abliterate.py --config recipes/qwen2.5-coder-0.5b/abliterate.yaml [--model Qwen/Qwen2-7B-Instruct] [--output_dir OUT]
"""

import sys

from deccp.abliteration.run import main

if __name__ == "__main__":
    sys.exit(main())
