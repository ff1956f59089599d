#!/usr/bin/env python3
"""Reproduce Table 1 and Figures 3-6: a thin wrapper of `gqa-reproduce` (same flags).

  python scripts/reproduce_table1.py --preset mini --out runs/mini
"""
import sys

from gqa_flax.reproduce.cli import main

if __name__ == "__main__":
  sys.exit(main())
