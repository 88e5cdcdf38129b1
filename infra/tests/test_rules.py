"""Each invariant of infra/chorus.yaml is a rule (infra/rules/chorus_rules.py, or parliament for
IAM). These tests show that the real template passes every rule and that each rule fails on a copy
of the template broken in the one way it guards against: a rule that cannot fail proves nothing.

Run: .venv/bin/python -m unittest discover -s infra/tests (scripts/check-infra does).
"""

import copy
import json
import sys
import unittest

from cfnlint.template import Template

import template as tpl

sys.path.insert(0, str(tpl.RULES))
import chorus_rules  # noqa: E402

RULES = {
    cls.id: cls
    for cls in vars(chorus_rules).values()
    if isinstance(cls, type) and getattr(cls, "id", "").startswith("E9")
}


def failing_rules(template):
    cfn = Template(str(tpl.TEMPLATE), template, [tpl.REGION])
    return {rule_id for rule_id, cls in RULES.items() if cls().match(cfn)}


def resources(t):
    return t["Resources"]


def props(t, name):
    return t["Resources"][name]["Properties"]


def statement(t, role, sid):
    for s in props(t, role)["Policies"][0]["PolicyDocument"]["Statement"]:
        if s.get("Sid") == sid:
            return s
    raise KeyError(sid)


def esm(t):
    return props(t, "PublisherEventSourceMapping")


def user_data(t, name):
    data = props(t, name)["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    return data


def replace_in_user_data(name, old, new):
    def mutate(t):
        data = user_data(t, name)
        sub = data["Fn::Sub"]
        text = sub[0] if isinstance(sub, list) else sub
        assert old in text, old
        text = text.replace(old, new)
        if isinstance(sub, list):
            sub[0] = text
        else:
            data["Fn::Sub"] = text

    return mutate


def set_attr(name, key, value):
    def mutate(t):
        for attribute in props(t, name)["TargetGroupAttributes"]:
            if attribute["Key"] == key:
                attribute["Value"] = value

    return mutate


def drop_alarm_on(metric):
    def mutate(t):
        for name in [n for n, r in resources(t).items() if r["Type"] == "AWS::CloudWatch::Alarm"]:
            p = props(t, name)
            names = [p.get("MetricName")] + [
                m.get("MetricStat", {}).get("Metric", {}).get("MetricName") for m in p.get("Metrics", [])
            ]
            if metric in names:
                del resources(t)[name]

    return mutate


FIXTURES = tpl.ROOT / "infra" / "tests" / "fixtures"


def topic_queue_policy(deny=True, **deny_changes):
    """An AWS::SQS::QueuePolicy letting MessagesTopic write to PoisonQueue, as the template would
    hold one: the Allow for the topic and, unless deny=False, the explicit Deny for the rest."""
    queue = {"Fn::GetAtt": ["PoisonQueue", "Arn"]}
    statements = [{
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue,
        "Condition": {"ArnEquals": {"aws:SourceArn": {"Ref": "MessagesTopic"}}},
    }]
    if deny:
        statements.append({
            "Effect": "Deny",
            "Principal": "*",
            "Action": "sqs:SendMessage",
            "Resource": queue,
            "Condition": {"ArnNotEquals": {"aws:SourceArn": {"Ref": "MessagesTopic"}}},
            **deny_changes,
        })
    return {
        "Type": "AWS::SQS::QueuePolicy",
        "Condition": "IsAws",
        "Properties": {
            "Queues": [{"Ref": "PoisonQueue"}],
            "PolicyDocument": {"Version": "2012-10-17", "Statement": statements},
        },
    }


def add_resource(name, resource):
    return lambda t: resources(t).update({name: resource})


# (rule, what breaks, mutation). Each mutation breaks one invariant the issue names.
BREAKS = [
    ("E9001", "no UpdatePolicy on the gateway group", lambda t: resources(t)["GatewayGroup"].pop("UpdatePolicy")),
    ("E9001", "no CreationPolicy on the writer group", lambda t: resources(t)["WriterGroup"].pop("CreationPolicy")),
    ("E9001", "rolling update that does not wait for signals",
     lambda t: resources(t)["WriterGroup"]["UpdatePolicy"]["AutoScalingRollingUpdate"].update(WaitOnResourceSignals=False)),
    ("E9001", "launch template pinned to version 1",
     lambda t: props(t, "GatewayGroup")["LaunchTemplate"].update(Version="1")),
    ("E9001", "user data that never signals failure",
     replace_in_user_data("GatewayLaunchTemplate", "--status FAILURE", "--status SUCCESS")),
    ("E9002", "finite stream retries", lambda t: esm(t).update(MaximumRetryAttempts=10)),
    ("E9002", "records dropped after an hour", lambda t: esm(t).update(MaximumRecordAgeInSeconds=3600)),
    ("E9002", "stream read from LATEST", lambda t: esm(t).update(StartingPosition="LATEST")),
    ("E9002", "no partial batch responses", lambda t: esm(t).pop("FunctionResponseTypes")),
    ("E9003", "X-Ray switched on", lambda t: props(t, "PublisherFunction")["TracingConfig"].update(Mode="Active")),
    ("E9003", "log group without retention", lambda t: props(t, "PublisherLogGroup").pop("RetentionInDays")),
    ("E9003", "function logging to an unmanaged group", lambda t: props(t, "JanitorFunction").pop("LoggingConfig")),
    ("E9004", "table without deletion protection", lambda t: props(t, "MessagesTable").pop("DeletionProtectionEnabled")),
    ("E9004", "table deleted with the stack", lambda t: resources(t)["MessagesTable"].update(DeletionPolicy="Delete")),
    ("E9004", "no TTL", lambda t: props(t, "MessagesTable").pop("TimeToLiveSpecification")),
    ("E9005", "queue without SSE", lambda t: props(t, "PoisonQueue").pop("SqsManagedSseEnabled")),
    ("E9006", "HTTPS listener without a TLS 1.3 policy", lambda t: props(t, "GatewayListenerHttps").pop("SslPolicy")),
    ("E9006", "port 80 forwarding in cleartext",
     lambda t: props(t, "GatewayListenerRedirect").update(
         DefaultActions=[{"Type": "forward", "TargetGroupArn": {"Ref": "GatewayTargetGroup"}}])),
    ("E9006", "/metrics reachable from the internet",
     lambda t: props(t, "GatewayListenerHideInternals")["Conditions"][0]["PathPatternConfig"].update(Values=["/sns", "/sns/*"])),
    ("E9006", "no rule hiding /sns", lambda t: resources(t).pop("GatewayListenerHideInternals")),
    ("E9007", "gateway port open to the internet",
     lambda t: props(t, "GatewaySecurityGroup")["SecurityGroupIngress"].append(
         {"IpProtocol": "tcp", "FromPort": 8081, "ToPort": 8081, "CidrIp": "0.0.0.0/0"})),
    ("E9007", "the writers' ALB opened to the internet by a standalone ingress rule",
     lambda t: props(t, "WriterAlbIngressFromBackends").update(CidrIp="0.0.0.0/0", SourceSecurityGroupId=None)),
    ("E9007", "gateways with public addresses",
     lambda t: props(t, "GatewayLaunchTemplate")["LaunchTemplateData"].update(
         NetworkInterfaces=[{"DeviceIndex": 0, "AssociatePublicIpAddress": True}])),
    ("E9007", "gateways in public subnets",
     lambda t: props(t, "GatewayGroup").update(VPCZoneIdentifier={"Ref": "PublicSubnetIds"})),
    ("E9007", "IMDSv1 allowed",
     lambda t: props(t, "WriterLaunchTemplate")["LaunchTemplateData"]["MetadataOptions"].update(HttpTokens="optional")),
    ("E9008", "no SQS endpoint", lambda t: resources(t).pop("SqsEndpoint")),
    ("E9008", "no DynamoDB gateway endpoint", lambda t: resources(t).pop("DynamoDbEndpoint")),
    ("E9008", "Logs endpoint without private DNS", lambda t: props(t, "LogsEndpoint").update(PrivateDnsEnabled=False)),
    ("E9009", "ELB health on readiness", lambda t: props(t, "GatewayTargetGroup").update(HealthCheckPath="/readyz")),
    ("E9009", "no launch hook gating readiness",
     lambda t: props(t, "GatewayGroup").update(LifecycleHookSpecificationList=[
         h for h in props(t, "GatewayGroup")["LifecycleHookSpecificationList"] if h["LifecycleHookName"] != "ready"])),
    ("E9009", "no drain hook",
     lambda t: props(t, "GatewayGroup").update(LifecycleHookSpecificationList=[
         h for h in props(t, "GatewayGroup")["LifecycleHookSpecificationList"] if h["LifecycleHookName"] != "drain"])),
    ("E9010", "ALB cuts clients before the drain ends",
     set_attr("GatewayTargetGroup", "deregistration_delay.timeout_seconds", "45")),
    ("E9010", "drain allowed to outlast the ALB",
     lambda t: t["Parameters"]["DrainTimeoutSeconds"].update(MaxValue=600)),
    ("E9011", "a janitor timer on every gateway",
     replace_in_user_data("GatewayLaunchTemplate", "CHORUS_ROLE=gateway", "CHORUS_ROLE=gateway\nCHORUS_UNITS=chorus-janitor.timer")),
    ("E9011", "no janitor schedule", lambda t: resources(t).pop("JanitorSchedule")),
    ("E9011", "gateways can list the topic",
     lambda t: statement(t, "GatewayRole", "SubscribeOwnQueue").update(
         Action=["sns:Subscribe", "sns:ListSubscriptionsByTopic"])),
    ("E9012", "no IteratorAge alarm", drop_alarm_on("IteratorAge")),
    ("E9012", "no poison queue alarm", lambda t: resources(t).pop("PoisonQueueAlarm")),
    ("E9012", "no SNS delivery failure alarm", drop_alarm_on("NumberOfNotificationsFailed")),
    ("E9012", "no connections alarm", drop_alarm_on("chorus_gateway_connections")),
    ("E9012", "no dashboard", lambda t: resources(t).pop("Dashboard")),
    ("E9012", "no connection target tracking", lambda t: resources(t).pop("GatewayConnectionScaling")),
    ("E9013", "x86_64 by default", lambda t: t["Parameters"]["Architecture"].update(Default="x86_64")),
    ("E9013", "publisher pinned to x86_64", lambda t: props(t, "PublisherFunction").update(Architectures=["x86_64"])),
    ("E9015", "a queue the topic writes to, with no explicit Deny for other senders",
     add_resource("TopicQueuePolicy", topic_queue_policy(deny=False))),
    ("E9015", "the Deny names another topic than the Allow",
     add_resource("TopicQueuePolicy", topic_queue_policy(
         Condition={"ArnNotEquals": {"aws:SourceArn": {"Fn::Sub": "${MessagesTopic}-old"}}}))),
    ("E9015", "the Deny covers one principal only",
     add_resource("TopicQueuePolicy", topic_queue_policy(Principal={"AWS": {"Ref": "AWS::AccountId"}}))),
    ("E9016", "client tokens for any audience",
     replace_in_user_data("GatewayLaunchTemplate", "CHORUS_JWT_AUDIENCE=${ClientTokenAudience}\n", "")),
    ("E9016", "an audience that may be empty", lambda t: t["Parameters"]["ClientTokenAudience"].update(Default="")),
    ("E9016", "client tokens from any issuer",
     replace_in_user_data("GatewayLaunchTemplate", "CHORUS_JWT_ISSUER=${ClientTokenIssuerOrStack}\n", "")),
    ("E9016", "the issuer parameter used even when empty",
     replace_in_user_data("GatewayLaunchTemplate", "CHORUS_JWT_ISSUER=${ClientTokenIssuerOrStack}",
                          "CHORUS_JWT_ISSUER=${ClientTokenIssuer}")),
    ("E9017", "writers cannot read the service key", lambda t: props(t, "WriterRole")["Policies"][0]["PolicyDocument"].update(
        Statement=[s for s in props(t, "WriterRole")["Policies"][0]["PolicyDocument"]["Statement"] if s.get("Sid") != "ServiceKey"])),
    ("E9017", "gateways cannot read the second key of a rotation",
     lambda t: statement(t, "GatewayRole", "ServiceKey")["Resource"].pop()),
    ("E9017", "gateways may read every parameter under /chorus",
     lambda t: statement(t, "GatewayRole", "ServiceKey").update(
         Resource={"Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter/chorus/*"})),
    ("E9017", "writers not told which key to fetch",
     replace_in_user_data("WriterLaunchTemplate", "CHORUS_SERVICE_KEY_PARAMETER=${ServiceKeyParameter}\n", "")),
    ("E9017", "gateways never get the second key of a rotation",
     replace_in_user_data("GatewayLaunchTemplate", "CHORUS_SECOND_SERVICE_KEY_PARAMETER=${SecondServiceKeyParameter}\n", "")),
    ("E9017", "no service key by default", lambda t: t["Parameters"]["ServiceKeyParameter"].update(Default="")),
    ("E9014", "ws:// advertised", lambda t: t["Outputs"]["GatewayUrl"].update(Value={"Fn::Sub": "ws://${GatewayAlb.DNSName}/ws"})),
]


class TemplateRules(unittest.TestCase):
    def test_the_template_passes_every_rule(self):
        self.assertEqual(failing_rules(tpl.load()), set())

    def test_every_rule_has_a_break_that_it_catches(self):
        self.assertEqual({rule for rule, _, _ in BREAKS}, set(RULES))

    def test_each_break_fails_its_rule(self):
        original = tpl.load()
        for rule, what, mutate in BREAKS:
            with self.subTest(rule=rule, broken=what):
                broken = copy.deepcopy(original)
                mutate(broken)
                self.assertIn(rule, failing_rules(broken), f"{rule} did not catch: {what}")


class QueuePolicies(unittest.TestCase):
    """The queue policy rule (E9015) on the policy a gateway sets on its own queue at run time
    (crates/gateway/src/bus/sqs.rs): the fixture is what it must write; the allow-only fixture is the
    policy before issue 16, which let any account principal with sqs:SendMessage inject events."""

    def fixture(self, name):
        return json.loads((FIXTURES / name).read_text())

    def test_a_correct_queue_policy_in_the_template_passes(self):
        template = tpl.load()
        resources(template)["TopicQueuePolicy"] = topic_queue_policy()
        self.assertEqual(failing_rules(template), set())

    def test_the_gateway_queue_policy_denies_every_other_sender(self):
        self.assertEqual(chorus_rules.queue_policy_problems(self.fixture("gateway-queue-policy.json")), [])

    def test_allow_only_is_refused(self):
        problems = chorus_rules.queue_policy_problems(self.fixture("gateway-queue-policy-allow-only.json"))
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("no explicit Deny", problems[0])

    def test_each_weakening_of_the_deny_or_the_allow_is_refused(self):
        breaks = {
            "Deny narrowed by a second condition": lambda deny, allow: deny["Condition"].update(
                {"StringEquals": {"aws:PrincipalAccount": "123456789012"}}),
            "Deny for another topic": lambda deny, allow: deny["Condition"]["ArnNotEquals"].update(
                {"aws:SourceArn": "arn:aws:sns:us-east-1:123456789012:other"}),
            "Deny for one principal": lambda deny, allow: deny.update(
                Principal={"AWS": "arn:aws:iam::123456789012:root"}),
            "Deny of another action": lambda deny, allow: deny.update(Action="sqs:ReceiveMessage"),
            "Allow to every principal": lambda deny, allow: allow.update(Principal="*"),
            "Allow without aws:SourceArn": lambda deny, allow: allow.pop("Condition"),
        }
        for what, mutate in breaks.items():
            with self.subTest(broken=what):
                policy = self.fixture("gateway-queue-policy.json")
                allow, deny = policy["Statement"]
                mutate(deny, allow)
                self.assertNotEqual(chorus_rules.queue_policy_problems(policy), [], what)


class IamPolicies(unittest.TestCase):
    """parliament knows each action's resource types: an ARN of the wrong type, or a specific ARN
    for an action that only matches "*", is a finding."""

    def test_every_policy_is_clean(self):
        template = tpl.load()
        policies = list(tpl.iam_policies(template))
        self.assertEqual(len(policies), 4, [p[:2] for p in policies])
        for role, name, document in policies:
            with self.subTest(role=role, policy=name):
                self.assertEqual(tpl.parliament_findings(document), [])

    def test_the_service_key_is_readable_exactly_where_it_is_used(self):
        """Gateways and writers may read the service key's parameter, and during a rotation the
        second one, and no other parameter of that name space."""
        from unittest import mock

        arn = "arn:aws:ssm:us-east-1:123456789012:parameter"
        cases = {
            "one key": ({}, [f"{arn}/chorus/service-key"]),
            "rotation": ({"ServiceKeyParameter": "/chorus/service-key-2", "SecondServiceKeyParameter": "/chorus/service-key"},
                         [f"{arn}/chorus/service-key-2", f"{arn}/chorus/service-key"]),
        }
        for case, (parameters, expected) in cases.items():
            for role in ("GatewayRole", "WriterRole"):
                with self.subTest(case=case, role=role), mock.patch.dict(tpl.PARAMETERS, parameters):
                    template = tpl.load()
                    documents = [d for r, _, d in tpl.iam_policies(template) if r == role]
                    keys = [s for d in documents for s in d["Statement"] if s.get("Sid") == "ServiceKey"]
                    self.assertEqual([k["Resource"] for k in keys], [expected])
                    self.assertEqual(keys[0]["Action"], "ssm:GetParameter")
                    for document in documents:
                        self.assertEqual(tpl.parliament_findings(document), [])

    def test_wrongly_scoped_actions_are_found(self):
        breaks = [
            # The bug issue 15 reported: Unsubscribe scoped to the topic's "subscriptions".
            ("GatewayRole", "OwnSubscription", {"Fn::Sub": "${MessagesTopic}:*"}),
            # A queue action scoped to the topic.
            ("GatewayRole", "OwnQueue", {"Ref": "MessagesTopic"}),
            # Lifecycle actions scoped to the target group.
            ("GatewayRole", "LifecycleHooks", {"Ref": "GatewayTargetGroup"}),
            # DescribeTargetHealth has no resource type.
            ("GatewayRole", "WatchTheLoadBalancer", {"Ref": "GatewayTargetGroup"}),
            # The service key's parameter named without the parameter/ resource type.
            ("GatewayRole", "ServiceKey", {"Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:${ServiceKeyParameter}"}),
        ]
        for role, sid, resource in breaks:
            with self.subTest(role=role, statement=sid):
                template = tpl.load()
                statement(template, role, sid)["Resource"] = resource
                findings = [
                    f
                    for r, _, document in tpl.iam_policies(template)
                    if r == role
                    for f in tpl.parliament_findings(document)
                ]
                self.assertIn("RESOURCE_MISMATCH", [issue for issue, _ in findings])


if __name__ == "__main__":
    unittest.main()
