"""The mPLUG-Owl2 backbone: a torch-only port and the loader of its released checkpoints."""
