"""The janitor Lambda (infra/janitor/janitor.py) against the AWS emulator (moto, in process): it
removes the queue and subscription of a gateway whose instance left the group, keeps a live
gateway's, a young queue, and other stacks' queues, and removes nothing when the group is gone."""

import os
import pathlib
import sys
import time
import unittest

os.environ.update(
    AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_ENDPOINT_URL", None)

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "infra" / "janitor"))
import janitor  # noqa: E402

PREFIX = "chorus-gw-chorus-"
GROUP = "chorus-gateways"


@mock_aws
class Janitor(unittest.TestCase):
    def setUp(self):
        self.ec2 = boto3.client("ec2")
        self.autoscaling = boto3.client("autoscaling")
        self.sns = boto3.client("sns")
        self.sqs = boto3.client("sqs")
        image = "ami-12345678"  # the emulator launches any id (listing its images takes seconds)
        self.ec2.create_launch_template(
            LaunchTemplateName="gateways", LaunchTemplateData={"ImageId": image, "InstanceType": "t4g.nano"}
        )
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=GROUP, MinSize=2, MaxSize=2, DesiredCapacity=2,
            LaunchTemplate={"LaunchTemplateName": "gateways", "Version": "$Latest"}, AvailabilityZones=["us-east-1a"],
        )
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
        self.live = [i["InstanceId"] for i in group["Instances"]]
        self.assertEqual(len(self.live), 2)
        self.topic = self.sns.create_topic(Name="chorus-messages")["TopicArn"]

    def gateway_queue(self, name):
        url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sub = self.sns.subscribe(TopicArn=self.topic, Protocol="sqs", Endpoint=arn, ReturnSubscriptionArn=True)
        return url, sub["SubscriptionArn"]

    def prune(self, now):
        return janitor.prune(self.sns, self.sqs, self.autoscaling, self.topic, PREFIX, GROUP, 600, now=now)

    def queues(self):
        return sorted(u.rsplit("/", 1)[-1] for u in self.sqs.list_queues().get("QueueUrls", []))

    def subscriptions(self):
        return sorted(s["SubscriptionArn"] for s in self.sns.list_subscriptions_by_topic(TopicArn=self.topic)["Subscriptions"])

    def test_removes_only_what_dead_gateways_left(self):
        _, live_sub = self.gateway_queue(f"{PREFIX}{self.live[0]}-0a1b2c3d")
        _, dead_sub = self.gateway_queue(f"{PREFIX}i-0deaddeaddeaddead-11111111")
        _, other_stack = self.gateway_queue("chorus-gw-other-i-0deaddeaddeaddead-22222222")
        # A dead gateway whose queue is gone already but whose subscription stayed.
        url, orphan_sub = self.gateway_queue(f"{PREFIX}i-0feedfeedfeedfeed-33333333")
        self.sqs.delete_queue(QueueUrl=url)

        result = self.prune(now=time.time() + 3600)

        self.assertEqual(result["deleted_queues"], [f"{PREFIX}i-0deaddeaddeaddead-11111111"])
        self.assertEqual(sorted(result["unsubscribed"]), sorted([dead_sub, orphan_sub]))
        self.assertEqual(
            self.queues(), sorted([f"{PREFIX}{self.live[0]}-0a1b2c3d", "chorus-gw-other-i-0deaddeaddeaddead-22222222"])
        )
        self.assertEqual(self.subscriptions(), sorted([live_sub, other_stack]))
        # Running it again changes nothing.
        again = self.prune(now=time.time() + 3600)
        self.assertEqual((again["deleted_queues"], again["unsubscribed"]), ([], []))

    def test_never_touches_a_queue_whose_instance_id_was_cut(self):
        # A long stack name: the gateway's id, and so the instance id in the name, is cut short.
        _, sub = self.gateway_queue(f"{PREFIX}i-0deaddeadd-66666666")
        result = self.prune(now=time.time() + 3600)
        self.assertEqual((result["deleted_queues"], result["unsubscribed"]), ([], []))
        self.assertEqual(self.subscriptions(), [sub])

    def test_keeps_a_young_queue(self):
        _, sub = self.gateway_queue(f"{PREFIX}i-0deaddeaddeaddead-44444444")
        result = self.prune(now=time.time())
        self.assertEqual((result["deleted_queues"], result["unsubscribed"]), ([], []))
        self.assertEqual(result["kept_young"], [f"{PREFIX}i-0deaddeaddeaddead-44444444"])
        self.assertEqual(self.subscriptions(), [sub])

    def test_removes_nothing_when_the_group_is_missing(self):
        self.gateway_queue(f"{PREFIX}i-0deaddeaddeaddead-55555555")
        with self.assertRaises(janitor.JanitorError):
            janitor.prune(self.sns, self.sqs, self.autoscaling, self.topic, PREFIX, "no-such-group", 600,
                          now=time.time() + 3600)
        self.assertEqual(self.queues(), [f"{PREFIX}i-0deaddeaddeaddead-55555555"])


if __name__ == "__main__":
    unittest.main()
