"""Evaluate a model on deccp's eval split (refusal, CCP alignment, factuality, KL, capability) and write a report.

Usage:
    python eval/evaluate.py --model outputs/abliterated/qwen2.5-coder-0.5b --base default [--output_dir outputs/eval/abl]
    python eval/evaluate.py --config recipes/qwen2.5-coder-0.5b/eval.yaml
"""

import sys

from deccp.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
