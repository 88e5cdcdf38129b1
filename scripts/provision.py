"""Creates (or finds) the Chorus resources of infra/chorus.yaml with Environment=local (the table
and the topic) and prints TableName, StreamArn and TopicArn as KEY=VALUE lines. Used by
scripts/dev; idempotent. Endpoints come from the environment (AWS_ENDPOINT_URL and the
per-service AWS_ENDPOINT_URL_<SERVICE>), as for every other client.

- Where CloudFormation is served (moto, a LocalStack container, AWS), the stack is created there.
- When DynamoDB is served elsewhere (AWS_ENDPOINT_URL_DYNAMODB: DynamoDB Local, by default), the
  template's table is also created on that endpoint, from its definition in the template: the
  CloudFormation of another emulator cannot reach it (moto's stack keeps a copy of its own in
  moto, which nothing uses).
- Where CloudFormation is not served at all (a LocalStack started for SNS and SQS only, as
  scripts/localstack-test does), the template's local resources are created directly from their
  definitions.

usage: provision.py STACK_NAME TEMPLATE TABLE_NAME TOPIC_NAME
"""

import json
import os
import sys
import time

import boto3
from botocore.exceptions import ClientError
from cfnlint.decode import cfn_yaml


# How long a stack may go without any new status or event before provisioning gives up.
STACK_QUIET_SECS = 60


def log(message):
    print(f"provision: {message}", file=sys.stderr)


def resource(template, kind):
    """The Properties of the template's only resource of type `kind`, as plain JSON values."""
    found = [r for r in template["Resources"].values() if r["Type"] == kind]
    if len(found) != 1:
        sys.exit(f"the template has {len(found)} resources of type {kind}, expected 1")
    return json.loads(json.dumps(found[0].get("Properties", {})))


def create_table(props, name):
    """The template's table on the DynamoDB endpoint; returns its stream ARN."""
    dynamodb = boto3.client("dynamodb")
    try:
        dynamodb.describe_table(TableName=name)
    except ClientError as e:
        if e.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        request = {
            "TableName": name,
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PROVISIONED"),
        }
        if "StreamSpecification" in props:
            request["StreamSpecification"] = {
                "StreamEnabled": True,
                "StreamViewType": props["StreamSpecification"]["StreamViewType"],
            }
        # Point-in-time recovery and encryption at rest are AWS's business: an emulator has
        # neither, and nothing local depends on them.
        try:
            dynamodb.create_table(**request)
        except ClientError as e:
            if e.response["Error"]["Code"] != "ResourceInUseException":
                raise
    dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1})
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        current = dynamodb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
        if current.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            dynamodb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": True},
            )
    return dynamodb.describe_table(TableName=name)["Table"]["LatestStreamArn"]


def create_topic(props, name):
    """The template's topic, created directly; returns its ARN."""
    attributes = {
        key: str(value)
        for key, value in props.items()
        if key != "TopicName" and isinstance(value, (str, int, bool))
    }
    return boto3.client("sns").create_topic(Name=name, Attributes=attributes)["TopicArn"]


def create_stack(cfn, stack, body, table, topic):
    """The stack on CloudFormation (created if missing); returns its outputs."""
    try:
        cfn.describe_stacks(StackName=stack)
    except ClientError as e:
        if "does not exist" not in str(e):
            raise
        cfn.create_stack(
            StackName=stack,
            TemplateBody=body,
            Parameters=[
                {"ParameterKey": "Environment", "ParameterValue": "local"},
                {"ParameterKey": "TableName", "ParameterValue": table},
                {"ParameterKey": "TopicName", "ParameterValue": topic},
            ],
        )
    # Wait while the stack progresses: give up only when neither its status nor its events changed
    # for STACK_QUIET_SECS (a busy machine slows a stack down; it does not stop it).
    progress, since = None, time.monotonic()
    while True:
        status = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if status["StackStatus"].endswith("_COMPLETE") and "ROLLBACK" not in status["StackStatus"]:
            return {o["OutputKey"]: o["OutputValue"] for o in status.get("Outputs", [])}
        if "FAILED" in status["StackStatus"] or "ROLLBACK" in status["StackStatus"]:
            sys.exit(f"stack {stack}: {status['StackStatus']}: {status.get('StackStatusReason', '')}")
        events = cfn.describe_stack_events(StackName=stack)["StackEvents"]
        now = (status["StackStatus"], len(events), events[0]["EventId"] if events else None)
        if now != progress:
            progress, since = now, time.monotonic()
        elif time.monotonic() - since >= STACK_QUIET_SECS:
            sys.exit(f"stack {stack}: still {status['StackStatus']}, no new event for {STACK_QUIET_SECS} s")
        time.sleep(0.2)


def cloudformation_served(cfn):
    """Whether the CloudFormation endpoint serves CloudFormation (LocalStack answers 501 for a
    service it was not started with)."""
    try:
        cfn.list_stacks()
        return True
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
            return False
        raise


def main():
    stack, template_path, table, topic = sys.argv[1:5]
    with open(template_path) as f:
        body = f.read()
    template = cfn_yaml.loads(body)
    env = os.environ
    dynamodb_endpoint = env.get("AWS_ENDPOINT_URL_DYNAMODB")
    cfn_endpoint = env.get("AWS_ENDPOINT_URL_CLOUDFORMATION") or env.get("AWS_ENDPOINT_URL")
    dynamodb_elsewhere = bool(dynamodb_endpoint) and dynamodb_endpoint != cfn_endpoint

    cfn = boto3.client("cloudformation")
    if cloudformation_served(cfn):
        outputs = create_stack(cfn, stack, body, table, topic)
    else:
        log(f"CloudFormation is not served at {cfn_endpoint}: creating the template's table and topic directly")
        outputs = {
            "TableName": table,
            "TopicArn": create_topic(resource(template, "AWS::SNS::Topic"), topic),
        }
        dynamodb_elsewhere = True
    if dynamodb_elsewhere:
        log(f"creating the template's table {table} on DynamoDB at {dynamodb_endpoint or cfn_endpoint}")
        outputs["TableName"] = table
        outputs["StreamArn"] = create_table(resource(template, "AWS::DynamoDB::Table"), table)
    for key, value in outputs.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
