"""Amazon Kinesis Data Firehose sink (PutRecordBatch), split as Vector's: records, batches, the
API call and its error classification, and the sink driving them."""

from aggregator.sinks.firehose.sink import FirehoseSink

__all__ = ["FirehoseSink"]
