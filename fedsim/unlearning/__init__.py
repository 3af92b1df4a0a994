"""APA-style exact unlearning (docs/unlearning.md): shard adapters that never mix
(`partition`, `sharded`), retraining only the shards a deletion touches (`unlearn`), and the
per-row merge of the shard adapters at inference (`merge`)."""
