"""Fine-tune a causal LM patched by hf_longctx for long context.

    accelerate launch --config_file recipes/accelerate/<launch>.yaml recipes/finetune.py \
        --config recipes/configs/<recipe>.yaml [--any_key value ...]

Every key of the YAML config can be overridden on the command line; `--help` lists them all
(model, data, LoRA, and every transformers.TrainingArguments field). The work is done by
hf_longctx.training (see hf_longctx/training/recipe.py).
"""

from hf_longctx.training.recipe import main

if __name__ == "__main__":
    main()
