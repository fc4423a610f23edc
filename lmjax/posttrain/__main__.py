"""`python -m lmjax.posttrain --mode=sft|dpo|reward|ppo --config=configs/posttrain/<x>.py --init_from=DIR --workdir=OUT`.

Parses flags and calls `lmjax.posttrain.trainer.train`. `--init_from` is the run to post-train (a
pretraining workdir, or an SFT workdir for DPO); the model and tokenizer come from its newest
checkpoint. Re-running the same command resumes. Any config key can be overridden, e.g.
`--config.posttrain.train_file=data.jsonl --config.dpo.beta=0.2`; mistakes end with one `error:` line.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmjax import cli
from lmjax.posttrain import config as pt_config
from lmjax.posttrain import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset, e.g. configs/posttrain/sft.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, summary.json.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Workdir whose newest checkpoint is the starting model.")
_MODE = flags.DEFINE_enum("mode", None, list(pt_config.MODES), "sft, dpo, reward (a reward model) or ppo.")
flags.mark_flags_as_required(["config", "workdir", "init_from", "mode"])


main = cli.absl_main(lambda: trainer.train(_MODE.value, _CONFIG.value, _INIT_FROM.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
