"""Helpers shared by the infra tests: load infra/chorus.yaml as cfn-lint reads it, lint it (with our
rules), and resolve the intrinsic functions of its IAM policies into the ARNs a real stack would
have, so parliament can check each action against the resource types it really takes."""

import copy
import json
import pathlib
import re

from cfnlint import api as cfnlint_api
from cfnlint.decode import cfn_yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "chorus.yaml"
RULES = ROOT / "infra" / "rules"

ACCOUNT = "123456789012"
REGION = "us-east-1"
STACK = "chorus"
PSEUDO = {
    "AWS::AccountId": ACCOUNT,
    "AWS::Region": REGION,
    "AWS::Partition": "aws",
    "AWS::StackName": STACK,
    "AWS::StackId": f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{STACK}/0f8e6f20-0000-11ef-9a3b-0a1b2c3d4e5f",
    "AWS::URLSuffix": "amazonaws.com",
}
# Values an aws stack gets for the parameters whose defaults are empty (a test may add more).
PARAMETERS = {
    "ArtifactBucket": "chorus-artifacts",
    "ArtifactPrefix": "chorus/0123abc/arm64",
    "VpcId": "vpc-0123456789abcdef0",
}


def load():
    """The template as a dict (the form cfn-lint's rules see)."""
    return cfn_yaml.load(str(TEMPLATE))


def dump(template):
    """A template dict back to text cfn-lint can read (JSON is YAML)."""
    return json.dumps(template, indent=1, default=str)


def lint(template_text, rules=True):
    """cfn-lint matches for a template's text, with our rules appended."""
    config = cfnlint_api.ManualArgs(
        append_rules=[str(RULES)] if rules else [],
        regions=[REGION],
    )
    return cfnlint_api.lint(template_text, config=config)


def _physical(template, name):
    resource = template["Resources"][name]
    kind = resource["Type"]
    props = resource.get("Properties") or {}
    if kind == "AWS::SNS::Topic":
        return f"arn:aws:sns:{REGION}:{ACCOUNT}:{resolve(template, props.get('TopicName', name))}"
    if kind == "AWS::SQS::Queue":
        return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{STACK}-{name}-ABC123"
    if kind == "AWS::Logs::LogGroup":
        return resolve(template, props.get("LogGroupName", name))
    if kind == "AWS::ElasticLoadBalancingV2::TargetGroup":
        return f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/{STACK}-{name}/0123456789abcdef"
    if kind == "AWS::DynamoDB::Table":
        return resolve(template, props.get("TableName", name))
    return f"{STACK}-{name}-ABC123"


def _attribute(template, name, attribute):
    resource = template["Resources"][name]
    kind = resource["Type"]
    if kind == "AWS::SQS::Queue" and attribute == "Arn":
        return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-{name}-ABC123"
    if kind == "AWS::SQS::Queue" and attribute == "QueueName":
        return f"{STACK}-{name}-ABC123"
    if kind == "AWS::DynamoDB::Table":
        table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{_physical(template, name)}"
        # A real stream label is a timestamp with colons (2026-01-01T00:00:00.000); parliament
        # splits ARNs at every colon, so the fake one has none.
        return table if attribute == "Arn" else f"{table}/stream/2026-01-01T00.00.00.000"
    if kind == "AWS::Logs::LogGroup" and attribute == "Arn":
        return f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{_physical(template, name)}:*"
    if kind == "AWS::Lambda::Function" and attribute == "Arn":
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{STACK}-{name}-ABC123"
    if kind == "AWS::IAM::Role" and attribute == "Arn":
        return f"arn:aws:iam::{ACCOUNT}:role/{STACK}-{name}-ABC123"
    return f"{STACK}-{name}-{attribute}"


# What Ref AWS::NoValue resolves to: removed from the list or object holding it.
NO_VALUE = object()


def condition(template, name_or_expression):
    """Evaluates a condition (by name, or an Fn::Equals/Not/And/Or expression) for PARAMETERS."""
    if isinstance(name_or_expression, str):
        return condition(template, template["Conditions"][name_or_expression])
    (key, arg), = name_or_expression.items()
    if key == "Condition":
        return condition(template, arg)
    if key == "Fn::Equals":
        return resolve(template, arg[0]) == resolve(template, arg[1])
    if key == "Fn::Not":
        return not condition(template, arg[0])
    if key == "Fn::And":
        return all(condition(template, c) for c in arg)
    if key == "Fn::Or":
        return any(condition(template, c) for c in arg)
    raise ValueError(f"unknown condition function {key}")


def resolve(template, value):
    """Resolves Ref, Fn::GetAtt, Fn::Sub, Fn::Join and Fn::If the way a stack in us-east-1 with
    PARAMETERS would."""
    if isinstance(value, list):
        return [r for r in (resolve(template, v) for v in value) if r is not NO_VALUE]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, arg), = value.items()
        if key == "Fn::If":
            name, then, otherwise = arg
            return resolve(template, then if condition(template, name) else otherwise)
        if key == "Ref":
            if arg == "AWS::NoValue":
                return NO_VALUE
            if arg in PSEUDO:
                return PSEUDO[arg]
            if arg in template.get("Parameters", {}):
                return PARAMETERS.get(arg, template["Parameters"][arg].get("Default"))
            return _physical(template, arg)
        if key == "Fn::GetAtt":
            name, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return _attribute(template, name, attribute)
        if key == "Fn::Sub":
            text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])

            def substitute(match):
                token = match.group(1)
                if token in extra:
                    return str(resolve(template, extra[token]))
                if "." in token and token.split(".")[0] in template.get("Resources", {}):
                    return str(_attribute(template, *token.split(".", 1)))
                return str(resolve(template, {"Ref": token}))

            return re.sub(r"\$\{([^}!]+)\}", substitute, text)
        if key == "Fn::Join":
            return arg[0].join(str(resolve(template, v)) for v in arg[1])
    return {k: r for k, r in ((k, resolve(template, v)) for k, v in value.items()) if r is not NO_VALUE}


def iam_policies(template):
    """(role, policy name, resolved policy document) for every inline policy of every role."""
    for name, resource in template.get("Resources", {}).items():
        if resource.get("Type") != "AWS::IAM::Role":
            continue
        for policy in (resource.get("Properties") or {}).get("Policies") or []:
            document = resolve(template, copy.deepcopy(policy["PolicyDocument"]))
            yield name, policy["PolicyName"], document


def parliament_findings(document):
    """parliament's findings for one policy document, as (issue, detail) pairs."""
    from parliament import analyze_policy_string

    policy = analyze_policy_string(json.dumps(document))
    return [(finding.issue, finding.detail) for finding in policy.findings]
