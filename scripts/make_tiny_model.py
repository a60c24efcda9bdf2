"""Write a tiny MoE model directory for vLLM's dummy loader (see ascend_patch/harness/tiny_model.py)."""

from ascend_patch.harness.tiny_model import main

if __name__ == "__main__":
    main()
