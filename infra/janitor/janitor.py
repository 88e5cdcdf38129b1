"""Chorus janitor: the stack's one janitor (an AWS Lambda function, python3.13, run every 5
minutes by an EventBridge schedule; see infra/chorus.yaml and docs/decisions/0007).

A gateway on the SQS bus owns a queue `chorus-gw-<stack>-<instance id>-<random>` subscribed to the
topic, and removes both when it drains. A gateway that dies without draining (instance lost,
kernel panic, SIGKILL) leaves them behind: SNS keeps filling the queue for nobody. This janitor
removes the queues, and their subscriptions, whose instance is no longer in the gateway Auto
Scaling group. A queue younger than CHORUS_MIN_QUEUE_AGE_SECS is never touched, and nothing is
removed if the group cannot be read (an empty answer must not look like "every gateway is dead").

Only boto3 (in the Lambda runtime) and the standard library. Tested against the AWS emulator by
infra/tests/test_janitor.py.
"""

import json
import logging
import os
import re
import time

INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
logger = logging.getLogger("chorus-janitor")
logger.setLevel(logging.INFO)


class JanitorError(Exception):
    """The janitor refuses to act (e.g. the gateway group is not there)."""


def live_instances(autoscaling, group_name):
    """Instance ids of the group, whatever their lifecycle state (a leaving gateway drains itself)."""
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name])["AutoScalingGroups"]
    if len(groups) != 1:
        raise JanitorError(f"Auto Scaling group {group_name!r} not found: removing nothing")
    return {instance["InstanceId"] for instance in groups[0].get("Instances", [])}


def instance_of(queue_name, prefix):
    """`chorus-gw-<stack>-i-0abc…-1f2e3d4c` -> `i-0abc…`, or None for a name of another form."""
    if not queue_name.startswith(prefix):
        return None
    rest = queue_name[len(prefix):]
    instance, _, suffix = rest.rpartition("-")
    # Only a whole instance id counts: the gateway cuts its id at 50 characters, so with a stack
    # name over 30 characters the id in the name is cut and the queue is never touched.
    if not INSTANCE_ID.fullmatch(instance) or not suffix:
        return None
    return instance


def list_queues(sqs, prefix):
    urls, token = [], None
    while True:
        kwargs = {"QueueNamePrefix": prefix, "MaxResults": 1000}
        if token:
            kwargs["NextToken"] = token
        page = sqs.list_queues(**kwargs)
        urls.extend(page.get("QueueUrls", []))
        token = page.get("NextToken")
        if not token:
            return urls


def list_sqs_subscriptions(sns, topic_arn):
    subscriptions, token = [], None
    while True:
        kwargs = {"TopicArn": topic_arn}
        if token:
            kwargs["NextToken"] = token
        page = sns.list_subscriptions_by_topic(**kwargs)
        subscriptions.extend(s for s in page.get("Subscriptions", []) if s.get("Protocol") == "sqs")
        token = page.get("NextToken")
        if not token:
            return subscriptions


def prune(sns, sqs, autoscaling, topic_arn, prefix, group_name, min_age_secs, now=None):
    """Removes the queues and subscriptions of gateways that are gone. Returns what it did."""
    now = time.time() if now is None else now
    live = live_instances(autoscaling, group_name)
    dead_queues = {}  # queue name -> url
    kept_young = []
    for url in list_queues(sqs, prefix):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        instance = instance_of(name, prefix)
        if instance is None or instance in live:
            continue
        created = float(
            sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["CreatedTimestamp"])["Attributes"]["CreatedTimestamp"]
        )
        if now - created < min_age_secs:
            kept_young.append(name)
            continue
        dead_queues[name] = url

    unsubscribed = []
    for subscription in list_sqs_subscriptions(sns, topic_arn):
        queue_name = subscription.get("Endpoint", "").rsplit(":", 1)[-1]
        instance = instance_of(queue_name, prefix)
        if instance is None or instance in live:
            continue
        # A dead gateway's subscription: its queue is dead, or already gone.
        if queue_name in dead_queues or queue_name not in kept_young:
            sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
            unsubscribed.append(subscription["SubscriptionArn"])

    deleted = []
    for name, url in sorted(dead_queues.items()):
        sqs.delete_queue(QueueUrl=url)
        deleted.append(name)
    return {"live": sorted(live), "deleted_queues": deleted, "unsubscribed": unsubscribed, "kept_young": kept_young}


def handler(event, context):
    import boto3

    result = prune(
        boto3.client("sns"),
        boto3.client("sqs"),
        boto3.client("autoscaling"),
        topic_arn=os.environ["CHORUS_TOPIC_ARN"],
        prefix=os.environ["CHORUS_QUEUE_PREFIX"],
        group_name=os.environ["CHORUS_GATEWAY_GROUP"],
        min_age_secs=int(os.environ.get("CHORUS_MIN_QUEUE_AGE_SECS", "600")),
    )
    logger.info(json.dumps({"message": "janitor done", **result}))
    return result
