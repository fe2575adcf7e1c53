"""The pure splice plan: (headers, alignment, choice of blocks) -> plan.

recipe.py reads recipes; alignment.py and blocks.py hold the layer-block
rules; job.py opens the teacher and student and checks them against each
other; plan.py turns a choice of blocks into "output tensor <- source byte
range"; configs.py rewrites config.json for it; sizes.py picks sizes. Nothing
here writes a byte.
"""
