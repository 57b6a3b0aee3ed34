"""On-disk logs: the manifest, the shard writer thread and the memory-mapped reader."""
