"""scripts/replay_failures.py against the AWS emulator (moto, in process): an on-failure entry is
turned back into the stream records it names, handed to the publisher as a DynamoDB stream event,
and deleted only when the publisher reports no failed record."""

import io
import json
import os
import pathlib
import sys
import unittest

os.environ.update(
    AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    # This botocore sends DynamoDB Streams calls to account-based hosts (<account>.streams-ddb…),
    # which the emulator does not route.
    AWS_ACCOUNT_ID_ENDPOINT_MODE="disabled",
)
os.environ.pop("AWS_ENDPOINT_URL", None)

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import replay_failures  # noqa: E402


@mock_aws
class Replay(unittest.TestCase):
    def setUp(self):
        self.dynamodb = boto3.client("dynamodb")
        self.streams = boto3.client("dynamodbstreams")
        self.sqs = boto3.client("sqs")
        table = self.dynamodb.create_table(
            TableName="chorus-messages",
            AttributeDefinitions=[{"AttributeName": "room", "AttributeType": "S"}, {"AttributeName": "seq", "AttributeType": "N"}],
            KeySchema=[{"AttributeName": "room", "KeyType": "HASH"}, {"AttributeName": "seq", "KeyType": "RANGE"}],
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
        )["TableDescription"]
        self.stream_arn = table["LatestStreamArn"]
        for seq in range(1, 6):
            self.dynamodb.put_item(TableName="chorus-messages", Item={
                "room": {"S": "lobby"}, "seq": {"N": str(seq)}, "id": {"S": f"m{seq}"},
                "sender": {"S": "john"}, "body": {"S": f"hello {seq}"}, "ts": {"S": "2026-01-01T00:00:00.000Z"},
            })
        shard = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]["Shards"][0]["ShardId"]
        iterator = self.streams.get_shard_iterator(StreamArn=self.stream_arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        self.sequence = [r["dynamodb"]["SequenceNumber"] for r in self.streams.get_records(ShardIterator=iterator)["Records"]]
        self.assertEqual(len(self.sequence), 5)
        self.queue = self.sqs.create_queue(QueueName="failures")["QueueUrl"]
        # What Lambda puts in an on-failure destination for a stream batch: records 2..4.
        self.sqs.send_message(QueueUrl=self.queue, MessageBody=json.dumps({
            "requestContext": {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": 11},
            "DDBStreamBatchInfo": {
                "shardId": shard, "startSequenceNumber": self.sequence[1], "endSequenceNumber": self.sequence[3],
                "streamArn": self.stream_arn, "batchSize": 3,
            },
        }))

    def run_replay(self, answer):
        events = []

        def invoke(event):
            events.append(json.loads(json.dumps(event)))  # what would go over the wire
            return answer

        counts = replay_failures.replay(self.sqs, self.streams, invoke, self.queue, "us-east-1", out=io.StringIO())
        return counts, events

    def left(self):
        attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["All"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])

    def test_replays_exactly_the_range_then_deletes_the_entry(self):
        counts, events = self.run_replay(answer=[])
        self.assertEqual(counts["replayed"], 1)
        self.assertEqual(len(events), 1)
        records = events[0]["Records"]
        self.assertEqual([r["dynamodb"]["NewImage"]["seq"]["N"] for r in records], ["2", "3", "4"])
        self.assertEqual({r["eventSource"] for r in records}, {"aws:dynamodb"})
        self.assertEqual({r["eventSourceARN"] for r in records}, {self.stream_arn})
        self.assertEqual({r["eventName"] for r in records}, {"INSERT"})
        self.assertEqual(self.left(), 0)

    def test_keeps_the_entry_when_the_publisher_still_fails(self):
        counts, _ = self.run_replay(answer=[{"itemIdentifier": self.sequence[2]}])
        self.assertEqual((counts["replayed"], counts["failed"]), (0, 1))
        self.assertEqual(self.left(), 1)


if __name__ == "__main__":
    unittest.main()
