"""Creates (or finds) the Chorus CloudFormation stack on the emulator, with Environment=local,
and prints its outputs as KEY=VALUE lines. Used by scripts/dev; idempotent.

usage: provision.py STACK_NAME TEMPLATE TABLE_NAME TOPIC_NAME
"""

import sys
import time

import boto3
from botocore.exceptions import ClientError


def main():
    stack, template, table, topic = sys.argv[1:5]
    cfn = boto3.client("cloudformation")
    try:
        cfn.describe_stacks(StackName=stack)
    except ClientError as e:
        if "does not exist" not in str(e):
            raise
        with open(template) as f:
            body = f.read()
        cfn.create_stack(
            StackName=stack,
            TemplateBody=body,
            Parameters=[
                {"ParameterKey": "Environment", "ParameterValue": "local"},
                {"ParameterKey": "TableName", "ParameterValue": table},
                {"ParameterKey": "TopicName", "ParameterValue": topic},
            ],
        )
    for _ in range(300):
        status = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        if status["StackStatus"].endswith("_COMPLETE") and "ROLLBACK" not in status["StackStatus"]:
            for output in status.get("Outputs", []):
                print(f"{output['OutputKey']}={output['OutputValue']}")
            return
        if "FAILED" in status["StackStatus"] or "ROLLBACK" in status["StackStatus"]:
            sys.exit(f"stack {stack}: {status['StackStatus']}: {status.get('StackStatusReason', '')}")
        time.sleep(0.2)
    sys.exit(f"stack {stack} not complete after 60 s")


if __name__ == "__main__":
    main()
