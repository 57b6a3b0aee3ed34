"""Framework integrations, imported on demand so `import logix` never pulls them in:

- `logix.integrations.huggingface`: `LogIXCallback` for `transformers.Trainer`, post-hoc
  `extract_log` / `influence_of`, and old LogIX's `patch_trainer` / `LogIXArguments`.
- `logix.integrations.lightning`: `LogIXCallback` for `lightning.Trainer`, post-hoc helpers, and
  old LogIX's `patch` / `LogIXArguments`.
"""
