"""The one error type the data pipeline raises for mistakes the user can fix."""


class DataError(RuntimeError):
    """A user-fixable data problem; the message is one line naming the culprit and the fix.

    Examples: a missing or empty corpus, a shard that fails its checksum, a manifest whose
    tokenizer or seq_len disagrees with the model config. The CLI prints it and exits with 2.
    """


class CorruptData(DataError):
    """The data itself is damaged: a row failing its CRC-32, a truncated, missing or altered shard.

    A property of the files, not of the moment (unlike an unreachable server), so the decision it
    leads to (stop, or skip with ``data.skip_corrupt_shards``) is the same on every read, every
    rank and every resume.
    """
