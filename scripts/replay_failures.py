"""replay_failures.py — re-publishes the stream records that the publisher's event source mapping
gave up on (see scripts/replay-failures for usage).

The mapping's on-failure destination (the stack's PublisherFailureQueue) receives no records, only
where they were: {"DDBStreamBatchInfo": {"streamArn", "shardId", "startSequenceNumber",
"endSequenceNumber", ...}}. For each such entry this reads that range back from the stream, hands
it to the publisher function as the DynamoDB stream event it would have had, and deletes the
entry once the function reports no failed record. Gateways drop whatever they already had (per
room seq), so a replay never duplicates a message for a client.

The stream keeps records 24 hours: an older range is gone from it (the messages are still in the
table, and clients still get them from history on resume); such entries are reported and kept
unless --drop-expired.
"""

import argparse
import base64
import json
import sys


class Expired(Exception):
    """The stream no longer holds the range."""


def read_range(streams, info):
    """The stream records of one on-failure entry, in order."""
    start, end = int(info["startSequenceNumber"]), int(info["endSequenceNumber"])
    try:
        iterator = streams.get_shard_iterator(
            StreamArn=info["streamArn"],
            ShardId=info["shardId"],
            ShardIteratorType="AT_SEQUENCE_NUMBER",
            SequenceNumber=info["startSequenceNumber"],
        )["ShardIterator"]
    except streams.exceptions.TrimmedDataAccessException as e:
        raise Expired(str(e)) from e
    except streams.exceptions.ResourceNotFoundException as e:
        raise Expired(str(e)) from e
    records = []
    empty_pages = 0
    while iterator:
        page = streams.get_records(ShardIterator=iterator, Limit=1000)
        batch = page.get("Records", [])
        for record in batch:
            sequence = int(record["dynamodb"]["SequenceNumber"])
            if sequence > end:
                return records
            if sequence >= start:
                records.append(record)
        if records and int(records[-1]["dynamodb"]["SequenceNumber"]) >= end:
            return records
        # An open shard answers empty pages at its tip: stop after a few in a row.
        empty_pages = empty_pages + 1 if not batch else 0
        if empty_pages >= 3:
            return records
        iterator = page.get("NextShardIterator")
    return records


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "timestamp"):
        return int(value.timestamp())
    return value


def lambda_event(records, stream_arn, region):
    """The DynamoDB stream event Lambda would have built from these records."""
    return {
        "Records": [
            {
                "eventID": r["eventID"],
                "eventName": r["eventName"],
                "eventVersion": r.get("eventVersion", "1.1"),
                "eventSource": "aws:dynamodb",
                "awsRegion": r.get("awsRegion", region),
                "dynamodb": _jsonable(r["dynamodb"]),
                "eventSourceARN": stream_arn,
            }
            for r in records
        ]
    }


def lambda_invoker(lam, function):
    """Invokes the publisher synchronously; returns its batchItemFailures (a function error is a
    failure of the whole batch)."""

    def invoke(event):
        response = lam.invoke(FunctionName=function, InvocationType="RequestResponse", Payload=json.dumps(event))
        body = response["Payload"].read()
        if response.get("FunctionError"):
            raise RuntimeError(f"the publisher failed: {body[:500]!r}")
        return (json.loads(body or b"{}") or {}).get("batchItemFailures", [])

    return invoke


def replay(sqs, streams, invoke, queue_url, region, dry_run=False, drop_expired=False, max_entries=1000, out=sys.stdout):
    """Replays up to max_entries entries of the on-failure queue. Returns counts."""
    counts = {"replayed": 0, "records": 0, "failed": 0, "expired": 0, "dropped": 0}
    seen = 0
    while seen < max_entries:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=min(10, max_entries - seen),
            VisibilityTimeout=300, WaitTimeSeconds=1,
        ).get("Messages", [])
        if not messages:
            break
        for message in messages:
            seen += 1
            info = json.loads(message["Body"])["DDBStreamBatchInfo"]
            label = f"{info['shardId']} {info['startSequenceNumber']}..{info['endSequenceNumber']}"
            try:
                records = read_range(streams, info)
            except Expired as e:
                counts["expired"] += 1
                print(f"expired  {label}: {e}", file=out)
                if drop_expired and not dry_run:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                    counts["dropped"] += 1
                continue
            if dry_run:
                print(f"would replay {label}: {len(records)} records", file=out)
                continue
            # Lambda's own limit is 6 MB per synchronous payload: stay well under it.
            chunks, chunk, size = [], [], 0
            for record in records:
                length = len(json.dumps(_jsonable(record), default=str))
                if chunk and size + length > 4_000_000:
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(record)
                size += length
            if chunk:
                chunks.append(chunk)
            try:
                failures = []
                for part in chunks:
                    failures = invoke(lambda_event(part, info["streamArn"], region))
                    if failures:
                        break
            except Exception as e:  # noqa: BLE001 - reported, entry kept
                failures = [{"error": str(e)}]
            if failures:
                counts["failed"] += 1
                print(f"failed   {label}: {failures} (kept in the queue)", file=out)
                continue
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            counts["replayed"] += 1
            counts["records"] += len(records)
            print(f"replayed {label}: {len(records)} records", file=out)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", default="chorus", help="read the queue and function from this stack's outputs")
    parser.add_argument("--queue-url", help="the on-failure queue (default: stack output FailureQueueUrl)")
    parser.add_argument("--function", help="the publisher function (default: stack output PublisherFunctionName)")
    parser.add_argument("--region")
    parser.add_argument("--dry-run", action="store_true", help="read the ranges, invoke nothing, delete nothing")
    parser.add_argument("--drop-expired", action="store_true", help="delete entries whose range left the stream")
    parser.add_argument("--max-entries", type=int, default=1000)
    args = parser.parse_args(argv)

    import boto3

    session = boto3.session.Session(region_name=args.region)
    queue_url, function = args.queue_url, args.function
    if not (queue_url and function):
        stack = session.client("cloudformation").describe_stacks(StackName=args.stack)["Stacks"][0]
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        queue_url = queue_url or outputs["FailureQueueUrl"]
        function = function or outputs["PublisherFunctionName"]
    counts = replay(
        session.client("sqs"), session.client("dynamodbstreams"),
        lambda_invoker(session.client("lambda"), function), queue_url, session.region_name,
        dry_run=args.dry_run, drop_expired=args.drop_expired, max_entries=args.max_entries,
    )
    print(json.dumps(counts))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
