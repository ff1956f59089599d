"""End-to-end reproduction of Table 1 and Figures 3-6 (`gqa-reproduce`).

presets.py  the Preset (a gin file under configs/reproduce/) and its variants
stages.py   the stage plan: prepare -> pre-train -> convert -> uptrain -> fine-tune -> evaluate
runner.py   runs stages as processes, skips finished ones, shows the stage view
forkserver.py  forks each stage's process from a server that imported the libraries once
evaluate.py stage entry: greedy decoding on test splits, task metrics, time per sample
timing.py   decode timing helper and the Figure 6 stage (time per sample vs groups)
report.py   table1.json / table1.md from the stages' results
figures.py  fig3.png ... fig6.png
cli.py      the `gqa-reproduce` command
"""
