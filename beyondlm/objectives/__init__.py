"""Training objectives as pure functions of tensors: ``objectives.sft`` (token-level SFT losses),
``objectives.preference`` (preference and RL losses), one table each; ``objectives.table`` the
strict hyperparameter resolution they share. Import the submodule you use: a stage then depends
(in dvc.yaml) only on the table it runs.
"""
