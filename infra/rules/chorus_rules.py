"""Chorus's own cfn-lint rules: the invariants of infra/chorus.yaml that make a deploy work the first
time and keep working (issue 15). scripts/check-infra runs cfn-lint with `--append-rules
infra/rules`; infra/tests/test_rules.py breaks the template once per rule and asserts that rule
(and only a rule of ours) fails.

Each rule reads the template as written (intrinsic functions unresolved), so a check names the
logical ids and parameters it relies on. IAM resource types are checked by parliament, not here.
"""

from cfnlint.rules import CloudFormationLintRule, RuleMatch


def _props(resource):
    return resource.get("Properties") or {}


def _ref(value):
    return value.get("Ref") if isinstance(value, dict) else None


def _user_data(resource):
    """The text of a launch template's user data (its Fn::Sub string)."""
    data = _props(resource).get("LaunchTemplateData", {}).get("UserData", {})
    inner = data.get("Fn::Base64", data) if isinstance(data, dict) else data
    if isinstance(inner, dict):
        inner = inner.get("Fn::Sub", "")
    if isinstance(inner, list):
        inner = inner[0]
    return inner if isinstance(inner, str) else ""


def _launch_template_of(cfn, group):
    name = _ref(_props(group).get("LaunchTemplate", {}).get("LaunchTemplateId"))
    return name, cfn.template.get("Resources", {}).get(name, {})


class _Rule(CloudFormationLintRule):
    tags = ["chorus"]

    def _each(self, cfn, resource_type):
        return cfn.get_resources([resource_type]).items()


class RollingUpdateGatedOnSignals(_Rule):
    id = "E9001"
    shortdesc = "Auto Scaling groups roll on a new release and wait for readiness signals"
    description = (
        "Every ASG has a CreationPolicy.ResourceSignal and an AutoScalingRollingUpdate with "
        "WaitOnResourceSignals, follows the launch template's LatestVersionNumber, and its user "
        "data signals that ASG (and FAILURE on error)."
    )

    def match(self, cfn):
        matches = []
        for name, group in self._each(cfn, "AWS::AutoScaling::AutoScalingGroup"):
            path = ["Resources", name]
            signal = (group.get("CreationPolicy") or {}).get("ResourceSignal") or {}
            if not signal.get("Count") or not signal.get("Timeout"):
                matches.append(RuleMatch(path, f"{name}: no CreationPolicy.ResourceSignal"))
            rolling = (group.get("UpdatePolicy") or {}).get("AutoScalingRollingUpdate") or {}
            if rolling.get("WaitOnResourceSignals") is not True:
                matches.append(
                    RuleMatch(path, f"{name}: no AutoScalingRollingUpdate with WaitOnResourceSignals")
                )
            if "MinInstancesInService" not in rolling:
                matches.append(RuleMatch(path, f"{name}: rolling update without MinInstancesInService"))
            version = _props(group).get("LaunchTemplate", {}).get("Version")
            if not (isinstance(version, dict) and "LatestVersionNumber" in str(version)):
                matches.append(
                    RuleMatch(path, f"{name}: LaunchTemplate.Version must be LatestVersionNumber")
                )
            lt_name, lt = _launch_template_of(cfn, group)
            data = _user_data(lt)
            if f"CHORUS_STACK_RESOURCE={name}" not in data or (
                f"--logical-resource-id {name}" not in data or "--status FAILURE" not in data
            ):
                matches.append(
                    RuleMatch(
                        ["Resources", lt_name or name],
                        f"{name}: its user data does not signal {name} (success via "
                        "CHORUS_STACK_RESOURCE, FAILURE on error)",
                    )
                )
        return matches


class StreamRetriesUntilSuccess(_Rule):
    id = "E9002"
    shortdesc = "The stream mapping never discards good records"
    description = (
        "DynamoDB stream mappings retry until success (MaximumRetryAttempts -1, "
        "MaximumRecordAgeInSeconds -1), start at TRIM_HORIZON, report partial batch failures, "
        "bisect, and have an on-failure destination."
    )

    def match(self, cfn):
        matches = []
        for name, esm in self._each(cfn, "AWS::Lambda::EventSourceMapping"):
            p = _props(esm)
            path = ["Resources", name, "Properties"]
            wanted = {
                "MaximumRetryAttempts": -1,
                "MaximumRecordAgeInSeconds": -1,
                "StartingPosition": "TRIM_HORIZON",
                "BisectBatchOnFunctionError": True,
            }
            for key, value in wanted.items():
                if p.get(key) != value:
                    matches.append(RuleMatch(path + [key], f"{name}: {key} must be {value}"))
            if "ReportBatchItemFailures" not in (p.get("FunctionResponseTypes") or []):
                matches.append(RuleMatch(path, f"{name}: no ReportBatchItemFailures"))
            if not (p.get("DestinationConfig") or {}).get("OnFailure"):
                matches.append(RuleMatch(path, f"{name}: no on-failure destination"))
        return matches


class FunctionsLogAndDoNotTrace(_Rule):
    id = "E9003"
    shortdesc = "Lambda functions log to a retained group and do not switch on X-Ray"
    description = (
        "Every function names its log group (LoggingConfig.LogGroup, a group of this template "
        "with RetentionInDays) and has TracingConfig PassThrough (no role here allows xray)."
    )

    def match(self, cfn):
        matches = []
        resources = cfn.template.get("Resources", {})
        for name, function in self._each(cfn, "AWS::Lambda::Function"):
            p = _props(function)
            path = ["Resources", name, "Properties"]
            if (p.get("TracingConfig") or {}).get("Mode") != "PassThrough":
                matches.append(RuleMatch(path, f"{name}: TracingConfig.Mode must be PassThrough"))
            group = _ref((p.get("LoggingConfig") or {}).get("LogGroup"))
            if group not in resources or not _props(resources[group]).get("RetentionInDays"):
                matches.append(
                    RuleMatch(path, f"{name}: LoggingConfig.LogGroup must name a retained log group")
                )
        for name, group in self._each(cfn, "AWS::Logs::LogGroup"):
            if not _props(group).get("RetentionInDays"):
                matches.append(RuleMatch(["Resources", name], f"{name}: no RetentionInDays"))
        return matches


class TableIsSafe(_Rule):
    id = "E9004"
    shortdesc = "The messages table is retained, protected, recoverable and expires by TTL"
    description = (
        "DynamoDB tables: DeletionPolicy and UpdateReplacePolicy Retain, deletion protection on "
        "AWS, point-in-time recovery, TTL on `ttl`, a NEW_IMAGE stream."
    )

    def match(self, cfn):
        matches = []
        for name, table in self._each(cfn, "AWS::DynamoDB::Table"):
            p = _props(table)
            path = ["Resources", name]
            if table.get("DeletionPolicy") != "Retain" or table.get("UpdateReplacePolicy") != "Retain":
                matches.append(RuleMatch(path, f"{name}: Deletion/UpdateReplacePolicy must be Retain"))
            protection = p.get("DeletionProtectionEnabled")
            if protection is not True and protection != {"Fn::If": ["IsAws", True, False]}:
                matches.append(RuleMatch(path, f"{name}: DeletionProtectionEnabled must be on (on AWS)"))
            if not (p.get("PointInTimeRecoverySpecification") or {}).get("PointInTimeRecoveryEnabled"):
                matches.append(RuleMatch(path, f"{name}: no point-in-time recovery"))
            ttl = p.get("TimeToLiveSpecification") or {}
            if ttl.get("AttributeName") != "ttl" or ttl.get("Enabled") is not True:
                matches.append(RuleMatch(path, f"{name}: TTL must be enabled on `ttl`"))
            if (p.get("StreamSpecification") or {}).get("StreamViewType") != "NEW_IMAGE":
                matches.append(RuleMatch(path, f"{name}: the stream must be NEW_IMAGE"))
        return matches


class QueuesEncrypted(_Rule):
    id = "E9005"
    shortdesc = "Every SQS queue is encrypted at rest"
    description = "SQS queues set SqsManagedSseEnabled or a KMS key."

    def match(self, cfn):
        return [
            RuleMatch(["Resources", name], f"{name}: no server-side encryption")
            for name, queue in self._each(cfn, "AWS::SQS::Queue")
            if _props(queue).get("SqsManagedSseEnabled") is not True
            and not _props(queue).get("KmsMasterKeyId")
        ]


ALLOWED_SSL_POLICIES = {
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "ELBSecurityPolicy-TLS13-1-2-Res-2021-06",
    "ELBSecurityPolicy-TLS13-1-3-2021-06",
}


class PublicLoadBalancerIsTls(_Rule):
    id = "E9006"
    shortdesc = "The internet-facing ALB serves TLS only and hides the internal endpoints"
    description = (
        "An internet-facing load balancer has an HTTPS listener on 443 with a TLS 1.3 SslPolicy; "
        "every other listener only redirects to HTTPS; a rule on the HTTPS listener answers "
        "/sns and /metrics itself (fixed-response) so they never reach a gateway."
    )

    def match(self, cfn):
        matches = []
        listeners = cfn.get_resources(["AWS::ElasticLoadBalancingV2::Listener"])
        rules = cfn.get_resources(["AWS::ElasticLoadBalancingV2::ListenerRule"])
        for lb_name, lb in self._each(cfn, "AWS::ElasticLoadBalancingV2::LoadBalancer"):
            if _props(lb).get("Scheme") != "internet-facing":
                continue
            mine = {n: l for n, l in listeners.items() if _ref(_props(l).get("LoadBalancerArn")) == lb_name}
            https = [
                n
                for n, l in mine.items()
                if _props(l).get("Protocol") == "HTTPS"
                and _props(l).get("Port") == 443
                and _props(l).get("SslPolicy") in ALLOWED_SSL_POLICIES
            ]
            if not https:
                matches.append(RuleMatch(["Resources", lb_name], f"{lb_name}: no HTTPS:443 listener with a TLS 1.3 SslPolicy"))
            for n, l in mine.items():
                if n in https:
                    continue
                actions = _props(l).get("DefaultActions") or []
                redirect = all(
                    a.get("Type") == "redirect" and (a.get("RedirectConfig") or {}).get("Protocol") == "HTTPS"
                    for a in actions
                )
                if not actions or not redirect:
                    matches.append(RuleMatch(["Resources", n], f"{n}: a listener of {lb_name} that does not redirect to HTTPS"))
            hidden = set()
            for rule in rules.values():
                p = _props(rule)
                if _ref(p.get("ListenerArn")) not in https:
                    continue
                if not all(a.get("Type") == "fixed-response" for a in p.get("Actions") or []):
                    continue
                for condition in p.get("Conditions") or []:
                    hidden.update((condition.get("PathPatternConfig") or {}).get("Values") or [])
            for path in ("/sns", "/metrics"):
                if path not in hidden:
                    matches.append(RuleMatch(["Resources", lb_name], f"{lb_name}: {path} is reachable from the internet"))
        return matches


class NoPublicInstances(_Rule):
    id = "E9007"
    shortdesc = "No public ports but the load balancer's"
    description = (
        "Security groups open 0.0.0.0/0 (or ::/0) only on 80/443 of a group that an "
        "internet-facing ALB uses; launch templates give no public address and require IMDSv2; "
        "Auto Scaling groups live in PrivateSubnetIds."
    )

    def match(self, cfn):
        matches = []
        public_lb_groups = set()
        for _, lb in self._each(cfn, "AWS::ElasticLoadBalancingV2::LoadBalancer"):
            if _props(lb).get("Scheme") == "internet-facing":
                public_lb_groups.update(_ref(g) for g in _props(lb).get("SecurityGroups") or [])
        ingress = [
            (name, rule)
            for name, group in self._each(cfn, "AWS::EC2::SecurityGroup")
            for rule in _props(group).get("SecurityGroupIngress") or []
        ] + [
            # A standalone ingress rule opens the group it names.
            (_ref(_props(rule).get("GroupId")) or name, _props(rule))
            for name, rule in self._each(cfn, "AWS::EC2::SecurityGroupIngress")
        ]
        for name, rule in ingress:
            if rule.get("CidrIp") == "0.0.0.0/0" or rule.get("CidrIpv6") == "::/0":
                ports = (rule.get("FromPort"), rule.get("ToPort"))
                if name not in public_lb_groups or ports not in {(80, 80), (443, 443)}:
                    matches.append(RuleMatch(["Resources", name], f"{name}: open to the internet on {ports}"))
        for name, lt in self._each(cfn, "AWS::EC2::LaunchTemplate"):
            data = _props(lt).get("LaunchTemplateData") or {}
            for nic in data.get("NetworkInterfaces") or []:
                if nic.get("AssociatePublicIpAddress") not in (None, False):
                    matches.append(RuleMatch(["Resources", name], f"{name}: instances get a public address"))
            if (data.get("MetadataOptions") or {}).get("HttpTokens") != "required":
                matches.append(RuleMatch(["Resources", name], f"{name}: IMDSv2 (HttpTokens required) is not enforced"))
        for name, group in self._each(cfn, "AWS::AutoScaling::AutoScalingGroup"):
            if _ref(_props(group).get("VPCZoneIdentifier")) != "PrivateSubnetIds":
                matches.append(RuleMatch(["Resources", name], f"{name}: not in PrivateSubnetIds"))
        return matches


class PrivateSubnetsReachAws(_Rule):
    id = "E9008"
    shortdesc = "Private subnets reach every AWS API the instances call"
    description = (
        "Gateway endpoints for DynamoDB and S3; interface endpoints (unless PrivateEgress=nat) "
        "for SNS, SQS, SSM, CloudWatch Logs, CloudFormation (signals), Auto Scaling (lifecycle "
        "hooks) and Elastic Load Balancing (deregistration)."
    )
    gateway = {"dynamodb", "s3"}
    interface = {"sns", "sqs", "ssm", "logs", "cloudformation", "autoscaling", "elasticloadbalancing"}

    def match(self, cfn):
        found = {"Gateway": set(), "Interface": set()}
        for _, endpoint in self._each(cfn, "AWS::EC2::VPCEndpoint"):
            p = _props(endpoint)
            service = p.get("ServiceName")
            service = service.get("Fn::Sub", "") if isinstance(service, dict) else str(service)
            kind = p.get("VpcEndpointType", "Gateway")
            if kind == "Interface" and p.get("PrivateDnsEnabled") is not True:
                continue
            found.setdefault(kind, set()).add(service.rsplit(".", 1)[-1])
        missing = sorted(self.gateway - found["Gateway"]) + sorted(self.interface - found["Interface"])
        return [RuleMatch(["Resources"], f"no VPC endpoint for {service}") for service in missing]


class HealthIsLivenessReadinessGatesTraffic(_Rule):
    id = "E9009"
    shortdesc = "ELB health is liveness; readiness gates traffic through lifecycle hooks"
    description = (
        "The gateway target group checks /healthz; its ASG uses ELB health; a LAUNCHING hook "
        "(DefaultResult ABANDON) holds a new gateway out of the target group until ready, and a "
        "TERMINATING hook named drain holds a leaving one until it has drained."
    )

    def match(self, cfn):
        matches = []
        groups = cfn.template.get("Resources", {})
        group = groups.get("GatewayGroup")
        tg = groups.get("GatewayTargetGroup")
        if not group or not tg:
            return [RuleMatch(["Resources"], "GatewayGroup or GatewayTargetGroup is missing")]
        if _props(tg).get("HealthCheckPath") != "/healthz":
            matches.append(RuleMatch(["Resources", "GatewayTargetGroup"], "gateway health check must be /healthz (liveness)"))
        if _props(group).get("HealthCheckType") != "ELB":
            matches.append(RuleMatch(["Resources", "GatewayGroup"], "GatewayGroup must use ELB health"))
        hooks = _props(group).get("LifecycleHookSpecificationList") or []
        launching = [h for h in hooks if h.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_LAUNCHING"]
        if not any(h.get("DefaultResult") == "ABANDON" for h in launching):
            matches.append(RuleMatch(["Resources", "GatewayGroup"], "no LAUNCHING hook (DefaultResult ABANDON) gating readiness"))
        if not any(
            h.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_TERMINATING" and h.get("LifecycleHookName") == "drain"
            for h in hooks
        ):
            matches.append(RuleMatch(["Resources", "GatewayGroup"], "no TERMINATING hook named drain"))
        return matches


# The watcher polls every 5 s, then deregisters and stops the unit; the unit gets
# TimeoutStopSec = drain + 15 (chorus-bootstrap). Keep 30 s on top.
DRAIN_MARGIN_SECS = 5 + 15 + 30


class AlbOutlivesTheDrain(_Rule):
    id = "E9010"
    shortdesc = "The ALB keeps a leaving gateway's clients longer than the longest drain"
    description = (
        "The gateway target group's deregistration delay is at least DrainTimeoutSeconds' "
        f"MaxValue + {DRAIN_MARGIN_SECS} s, so the gateway (close 4000), not the ALB, ends "
        "the connections; the drain hook's HeartbeatTimeout covers the drain too."
    )

    def match(self, cfn):
        matches = []
        drain_max = int((cfn.template.get("Parameters", {}).get("DrainTimeoutSeconds") or {}).get("MaxValue", 10**6))
        tg = cfn.template.get("Resources", {}).get("GatewayTargetGroup", {})
        delay = None
        for attribute in _props(tg).get("TargetGroupAttributes") or []:
            if attribute.get("Key") == "deregistration_delay.timeout_seconds":
                try:
                    delay = int(attribute.get("Value"))
                except (TypeError, ValueError):
                    delay = None
        if delay is None or delay < drain_max + DRAIN_MARGIN_SECS:
            matches.append(
                RuleMatch(
                    ["Resources", "GatewayTargetGroup"],
                    f"deregistration delay {delay} < DrainTimeoutSeconds max {drain_max} + {DRAIN_MARGIN_SECS}",
                )
            )
        group = cfn.template.get("Resources", {}).get("GatewayGroup", {})
        for hook in _props(group).get("LifecycleHookSpecificationList") or []:
            if hook.get("LifecycleHookName") == "drain" and int(hook.get("HeartbeatTimeout", 0)) < drain_max + DRAIN_MARGIN_SECS:
                matches.append(RuleMatch(["Resources", "GatewayGroup"], "the drain hook times out before the longest drain"))
        return matches


class OneJanitor(_Rule):
    id = "E9011"
    shortdesc = "One scheduled janitor; gateways cannot list or prune the topic"
    description = (
        "A schedule (AWS::Events::Rule) invokes a janitor function; no launch template runs "
        "prune-subscriptions or a janitor timer; the gateway role does not list the topic's "
        "subscriptions."
    )

    def match(self, cfn):
        matches = []
        resources = cfn.template.get("Resources", {})
        scheduled = {
            (t.get("Arn") or {}).get("Fn::GetAtt", [None])[0]
            for _, rule in self._each(cfn, "AWS::Events::Rule")
            if _props(rule).get("ScheduleExpression")
            for t in _props(rule).get("Targets") or []
            if isinstance(t.get("Arn"), dict)
        }
        if "JanitorFunction" not in scheduled or "JanitorFunction" not in resources:
            matches.append(RuleMatch(["Resources"], "no schedule invokes JanitorFunction"))
        for name, lt in self._each(cfn, "AWS::EC2::LaunchTemplate"):
            data = _user_data(lt)
            if "prune-subscriptions" in data or "chorus-janitor" in data:
                matches.append(RuleMatch(["Resources", name], f"{name}: instances run a janitor"))
        role = resources.get("GatewayRole", {})
        if "sns:ListSubscriptionsByTopic" in str(_props(role).get("Policies")):
            matches.append(RuleMatch(["Resources", "GatewayRole"], "gateways may list (and so prune) the topic's subscriptions"))
        return matches


class Operable(_Rule):
    id = "E9012"
    shortdesc = "Alarms, a dashboard and connection-based scaling"
    description = (
        "Alarms on IteratorAge, Lambda Errors, the depth of the poison and failure queues, ALB "
        "5xx, send latency (writer TargetResponseTime), connections and SNS delivery failures; "
        "a dashboard; target tracking on chorus_gateway_connections for GatewayGroup."
    )
    wanted = [
        ("AWS/Lambda", "IteratorAge"),
        ("AWS/Lambda", "Errors"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count"),
        ("AWS/ApplicationELB", "TargetResponseTime"),
        ("AWS/SNS", "NumberOfNotificationsFailed"),
        ("Chorus", "chorus_gateway_connections"),
    ]

    def match(self, cfn):
        matches = []
        alarmed = set()
        queues_alarmed = set()
        for _, alarm in self._each(cfn, "AWS::CloudWatch::Alarm"):
            p = _props(alarm)
            metrics = [p] + [(m.get("MetricStat") or {}).get("Metric") or {} for m in p.get("Metrics") or []]
            for m in metrics:
                alarmed.add((m.get("Namespace"), m.get("MetricName")))
                for d in m.get("Dimensions") or []:
                    if d.get("Name") == "QueueName":
                        queues_alarmed.add(str(d.get("Value")))
        for want in self.wanted:
            if want not in alarmed:
                matches.append(RuleMatch(["Resources"], f"no alarm on {want[0]} {want[1]}"))
        for queue in ("PoisonQueue", "PublisherFailureQueue"):
            if queue not in " ".join(queues_alarmed):
                matches.append(RuleMatch(["Resources", queue], f"no depth alarm on {queue}"))
        if not cfn.get_resources(["AWS::CloudWatch::Dashboard"]):
            matches.append(RuleMatch(["Resources"], "no dashboard"))
        tracking = [
            p
            for _, policy in self._each(cfn, "AWS::AutoScaling::ScalingPolicy")
            for p in [_props(policy)]
            if _ref(p.get("AutoScalingGroupName")) == "GatewayGroup"
            and ((p.get("TargetTrackingConfiguration") or {}).get("CustomizedMetricSpecification") or {}).get("MetricName")
            == "chorus_gateway_connections"
        ]
        if not tracking:
            matches.append(RuleMatch(["Resources"], "no target tracking on chorus_gateway_connections"))
        return matches


class GravitonByDefault(_Rule):
    id = "E9013"
    shortdesc = "arm64 (Graviton) is the default architecture everywhere"
    description = "Parameter Architecture defaults to arm64 and every function's Architectures refers to it."

    def match(self, cfn):
        matches = []
        if (cfn.template.get("Parameters", {}).get("Architecture") or {}).get("Default") != "arm64":
            matches.append(RuleMatch(["Parameters", "Architecture"], "Architecture must default to arm64"))
        for name, function in self._each(cfn, "AWS::Lambda::Function"):
            if _props(function).get("Architectures") != [{"Ref": "Architecture"}]:
                matches.append(RuleMatch(["Resources", name], f"{name}: Architectures must be [!Ref Architecture]"))
        return matches


class ClientsUseWss(_Rule):
    id = "E9014"
    shortdesc = "The advertised client URL is wss://"
    description = "Output GatewayUrl names wss:// in every branch."

    def match(self, cfn):
        value = str((cfn.template.get("Outputs", {}).get("GatewayUrl") or {}).get("Value"))
        if "wss://" not in value or "ws://" in value.replace("wss://", ""):
            return [RuleMatch(["Outputs", "GatewayUrl"], "GatewayUrl must be wss:// only")]
        return []


# ---- issue 16: every door locked ---------------------------------------------------------------

def _as_list(value):
    return value if isinstance(value, list) else [value]


def _key(value):
    """A comparable form of a value that may still hold intrinsic functions."""
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _sends(statement):
    actions = _as_list(statement.get("Action") or [])
    return any(str(a).lower() in ("sqs:sendmessage", "sqs:*", "*") for a in actions)


def _source_arns(condition, operators):
    """The values of aws:SourceArn under any of `operators` in a statement's Condition."""
    found = []
    for operator, keys in (condition or {}).items():
        if operator not in operators or not isinstance(keys, dict):
            continue
        for key, value in keys.items():
            if key.lower() == "aws:sourcearn":
                found.extend(_as_list(value))
    return found


def queue_policy_problems(document):
    """What lets a sender other than the topic put messages in a queue, for one SQS queue policy
    (as written in the template, or the JSON a gateway sets on its queue): every statement that
    allows sqs:SendMessage names SNS as the principal and the topic as aws:SourceArn, and an
    explicit Deny of sqs:SendMessage for every principal (`*`) whose aws:SourceArn is not that
    topic stands beside it. IAM evaluates a negated condition on a missing key as true, so the
    Deny also covers a principal of the account calling SendMessage itself (no aws:SourceArn),
    whatever its own IAM policy allows; only an explicit Deny can override such an Allow."""
    statements = _as_list((document or {}).get("Statement") or [])
    problems = []
    topics = set()
    for s in statements:
        if s.get("Effect") != "Allow" or not _sends(s):
            continue
        sid = s.get("Sid", "an Allow statement")
        principal = s.get("Principal")
        services = _as_list(principal.get("Service")) if isinstance(principal, dict) else []
        if services != ["sns.amazonaws.com"] or set(principal) != {"Service"}:
            problems.append(f"{sid}: sqs:SendMessage allowed to {principal!r}, not only to SNS")
        arns = _source_arns(s.get("Condition"), ("ArnEquals", "ArnLike", "StringEquals"))
        if not arns:
            problems.append(f"{sid}: sqs:SendMessage allowed without an aws:SourceArn condition")
        topics.update(_key(a) for a in arns)
    if not topics:
        return problems
    denied = set()
    for s in statements:
        if s.get("Effect") != "Deny" or not _sends(s) or "NotPrincipal" in s or "NotAction" in s:
            continue
        if s.get("Principal") not in ("*", {"AWS": "*"}):
            continue
        condition = s.get("Condition") or {}
        arns = _source_arns(condition, ("ArnNotEquals", "ArnNotLike", "StringNotEquals"))
        # Any other condition would narrow the Deny to fewer callers.
        only_source = len(condition) == 1 and len(next(iter(condition.values()))) == 1
        if arns and only_source:
            denied.add(frozenset(_key(a) for a in arns))
    if frozenset(topics) not in denied:
        problems.append(
            "no explicit Deny of sqs:SendMessage to every principal (*) whose aws:SourceArn is "
            "not the topic: an account principal with sqs:SendMessage in its own policy could "
            "inject unsigned events"
        )
    return problems


class QueuesOnlyFromTheTopic(_Rule):
    id = "E9015"
    shortdesc = "A queue that the topic may write to refuses every other sender explicitly"
    description = (
        "Every AWS::SQS::QueuePolicy that allows sqs:SendMessage allows it to SNS with an "
        "aws:SourceArn condition, and explicitly denies sqs:SendMessage to every principal whose "
        "aws:SourceArn is not that topic. Gateways create their queues at run time "
        "(crates/gateway/src/bus/sqs.rs); infra/tests/fixtures/gateway-queue-policy.json is the "
        "policy they must set, checked by the same function."
    )

    def match(self, cfn):
        return [
            RuleMatch(["Resources", name, "Properties", "PolicyDocument"], f"{name}: {problem}")
            for name, policy in self._each(cfn, "AWS::SQS::QueuePolicy")
            for problem in queue_policy_problems(_props(policy).get("PolicyDocument"))
        ]


def _sub_variables(resource):
    """The variable map of a launch template's user data (the second item of a list Fn::Sub)."""
    data = _props(resource).get("LaunchTemplateData", {}).get("UserData", {})
    inner = data.get("Fn::Base64", data) if isinstance(data, dict) else data
    sub = inner.get("Fn::Sub") if isinstance(inner, dict) else None
    return sub[1] if isinstance(sub, list) and len(sub) > 1 and isinstance(sub[1], dict) else {}


def _never_empty(cfn, value):
    """Whether a Sub variable's value is non-empty on every stack: the stack's name, a parameter
    that cannot be empty, or an Fn::If choosing a parameter only when it is not empty."""
    parameters = cfn.template.get("Parameters", {})
    ref = _ref(value)
    if ref == "AWS::StackName":
        return True
    if ref in parameters:
        p = parameters[ref]
        return int(p.get("MinLength", 0)) >= 1 and str(p.get("Default", "x")) != ""
    if isinstance(value, dict) and isinstance(value.get("Fn::If"), list) and len(value["Fn::If"]) == 3:
        condition, then, otherwise = value["Fn::If"]
        guard = (cfn.template.get("Conditions") or {}).get(condition) or {}
        negated = guard.get("Fn::Not") if isinstance(guard, dict) else None
        tested = negated[0].get("Fn::Equals") if negated and isinstance(negated[0], dict) else None
        guarded = (
            _ref(then) in parameters
            and isinstance(tested, list)
            and sorted(map(_key, tested)) == sorted(map(_key, [{"Ref": _ref(then)}, ""]))
        )
        return (guarded or _never_empty(cfn, then)) and _never_empty(cfn, otherwise)
    return False


class ClientTokensNameAudienceAndIssuer(_Rule):
    id = "E9016"
    shortdesc = "Gateways of the stack check the aud and iss of client tokens"
    description = (
        "The gateway user data passes CHORUS_JWT_AUDIENCE and CHORUS_JWT_ISSUER to the bootstrap, "
        "each from a value that is never empty (a parameter with a non-empty default and "
        "MinLength 1, the stack's name, or a parameter used only when it is set)."
    )

    def match(self, cfn):
        import re

        matches = []
        lt = cfn.template.get("Resources", {}).get("GatewayLaunchTemplate", {})
        data = _user_data(lt)
        variables = _sub_variables(lt)
        for setting in ("CHORUS_JWT_AUDIENCE", "CHORUS_JWT_ISSUER"):
            found = re.search(rf"^\s*{setting}=\$\{{([^}}]+)\}}\s*$", data, re.M)
            name = found.group(1) if found else None
            value = variables.get(name, {"Ref": name}) if name else None
            if value is None or not _never_empty(cfn, value):
                matches.append(
                    RuleMatch(
                        ["Resources", "GatewayLaunchTemplate"],
                        f"GatewayLaunchTemplate: {setting} is not set from a value that is never "
                        "empty: gateways would accept client tokens for any audience or issuer",
                    )
                )
        return matches


class ServiceKeyFromSsm(_Rule):
    id = "E9017"
    shortdesc = "Gateways and writers share the service key from SSM, and read nothing else there"
    description = (
        "Parameter ServiceKeyParameter names an SSM parameter by default; the gateway and writer "
        "user data pass CHORUS_SERVICE_KEY_PARAMETER and CHORUS_SECOND_SERVICE_KEY_PARAMETER to "
        "the bootstrap; GatewayRole and WriterRole may ssm:GetParameter exactly "
        "parameter${ServiceKeyParameter} and parameter${SecondServiceKeyParameter} (and the "
        "gateways the client-token secret), never a wildcard."
    )
    roles = {"GatewayLaunchTemplate": "GatewayRole", "WriterLaunchTemplate": "WriterRole"}
    key_arns = ("parameter${ServiceKeyParameter}", "parameter${SecondServiceKeyParameter}")

    def match(self, cfn):
        matches = []
        resources = cfn.template.get("Resources", {})
        default = str((cfn.template.get("Parameters", {}).get("ServiceKeyParameter") or {}).get("Default", ""))
        if not default.startswith("/"):
            matches.append(RuleMatch(["Parameters", "ServiceKeyParameter"], "ServiceKeyParameter must name an SSM parameter by default"))
        for lt_name, role_name in self.roles.items():
            data = _user_data(resources.get(lt_name, {}))
            for setting, parameter in (
                ("CHORUS_SERVICE_KEY_PARAMETER", "ServiceKeyParameter"),
                ("CHORUS_SECOND_SERVICE_KEY_PARAMETER", "SecondServiceKeyParameter"),
            ):
                if f"{setting}=${{{parameter}}}\n" not in data:
                    matches.append(RuleMatch(["Resources", lt_name], f"{lt_name}: user data does not pass {setting}=${{{parameter}}}"))
            granted = []
            for policy in _props(resources.get(role_name, {})).get("Policies") or []:
                for s in _as_list((policy.get("PolicyDocument") or {}).get("Statement") or []):
                    actions = [str(a).lower() for a in _as_list(s.get("Action") or [])]
                    if s.get("Effect") != "Allow" or not any(a.startswith("ssm:") or a == "*" for a in actions):
                        continue
                    for resource in _as_list(s.get("Resource") or []):
                        text = _key(resource)
                        if "*" in text:
                            matches.append(RuleMatch(["Resources", role_name], f"{role_name}: SSM access with a wildcard ({text})"))
                        granted.append(text)
            for arn in self.key_arns:
                if not any(arn in text for text in granted):
                    matches.append(RuleMatch(["Resources", role_name], f"{role_name}: no ssm:GetParameter on {arn}"))
        return matches
