"""Post-training: instruction tuning (SFT), preference optimisation (DPO, IPO), reward models and
RLHF with PPO, on the pretraining model, mesh, step, checkpoints and batch stream.

  chat.py          the chat template: roles and end-of-turn as reserved ids, per-token loss weights
  dataset.py       JSONL examples (sft: prompt/response or messages; pairs: prompt/chosen/rejected)
  batches.py       packed SFT rows, pair rows, the resumable batch stream
  losses.py        sequence log-probs, DPO/IPO, Bradley-Terry
  reward_model.py  the transformer trunk with a scalar head
  config.py        post-training config sections; model and tokenizer taken from --init_from
  init.py          loading --init_from, growing the vocabulary, the step-0 state
  loop.py          the run loop every mode shares: resume, checkpoints, metrics, evaluation, summary
  trainer.py       SFT, DPO and reward-model runs, and `train(mode, config, init_from, workdir)`
  ppo.py           PPO's arithmetic: KL estimators, per-token rewards, GAE, clipped objectives, adaptive KL
  actor_critic.py  PPO's policy + value network as one parameter tree
  ppo_trainer.py   the PPO run: rollouts with the KV-cache sampler, scoring, minibatch epochs
  synthetic.py     a checkable synthetic task (sums) for tests and demos
Command line: `python -m lmjax.posttrain --mode=sft|dpo|reward|ppo ...` (see __main__.py).
"""
