"""Post-training preset: dpo. The model and tokenizer come from --init_from; set the data with
--config.posttrain.train_file=FILE.jsonl (and optionally --config.posttrain.eval_file)."""

from lmjax.posttrain.config import default_config


def get_config():
    c = default_config("dpo")
    c.dpo.update(beta=0.1, loss="sigmoid")  # loss="ipo" for IPO
    c.optim.lr = 1e-4
    return c
