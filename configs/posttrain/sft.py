"""Post-training preset: sft. The model and tokenizer come from --init_from; set the data with
--config.posttrain.train_file=FILE.jsonl (and optionally --config.posttrain.eval_file)."""

from lmjax.posttrain.config import default_config


def get_config():
    c = default_config("sft")
    c.sft.prompt_loss_weight = 0.0  # learn the responses only
    c.optim.lr = 3e-4
    return c
