"""The one error type the data pipeline raises for mistakes the user can fix."""


class DataError(RuntimeError):
    """A user-fixable data problem; the message is one line naming the culprit and the fix.

    Examples: a missing or empty corpus, a shard that fails its checksum, a manifest whose
    tokenizer or seq_len disagrees with the model config. The CLI prints it and exits with 2.
    """
