"""Training configs: `python -m scripts.train --config=scripts/configs/train/<name>.py[:arg]`."""
