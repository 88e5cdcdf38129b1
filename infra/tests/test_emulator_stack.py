"""The whole aws template, created on the AWS emulator (moto server, in process, 127.0.0.1), then:
what the emulator built is what the rules promise; and `cargo lambda deploy` of the publisher (the
real cargo-lambda, with crates/publisher/Cargo.toml's metadata) replaces the code but leaves the
configuration the stack set: environment, tracing, memory, timeout, role, architecture.

moto creates every resource of the template (with its default parameters) except those of the
types in EMULATOR_SKIPS, which it accepts and does not create, and those under the conditions
UseInterfaceEndpoints and HasDomain, which it does not evaluate as AWS does. It runs no instance, Lambda or load balancer: readiness signals,
lifecycle hooks, rolling updates and traffic are verified only on AWS (docs/operations.md).
"""

import io
import logging
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile

os.environ.update(
    AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_ENDPOINT_URL", None)

import boto3  # noqa: E402
from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "chorus.yaml"
BUCKET = "chorus-artifacts"
PREFIX = "chorus/0123abc/arm64"
# Not "chorus": the stack's name is the default issuer of client tokens, "chorus" their default audience.
STACK = "chorus-test"
# Resource types the emulator's CloudFormation accepts but does not create.
EMULATOR_SKIPS = {
    "AWS::EC2::VPCEndpoint",
    "AWS::AutoScaling::ScalingPolicy",
    "AWS::CloudWatch::Alarm",
}


def elf(machine):
    """A 64-byte ELF64 header for `machine` (183: AArch64, 62: x86-64): enough for cargo-lambda to
    read the architecture of a 'bootstrap' without building one."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0)


def zipped(name, data):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


class EmulatorStack(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        cls.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        cls.server.start()
        host, port = cls.server.get_host_and_port()
        cls.endpoint = f"http://{host}:{port}"
        client = lambda name: boto3.client(name, endpoint_url=cls.endpoint)  # noqa: E731
        cls.aws = staticmethod(client)
        s3 = client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/publisher.zip", Body=zipped("bootstrap", elf(183)))
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/janitor.zip", Body=zipped("janitor.py", b"def handler(e, c): pass\n"))
        ec2 = client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"us-east-1{zone}")["Subnet"]["SubnetId"]
            for i, zone in enumerate("abcd")
        ]
        route_table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        certificate = client("acm").request_certificate(DomainName="chat.example.com")["CertificateArn"]
        cls.backends = ec2.create_security_group(GroupName="backends", Description="backends", VpcId=vpc)["GroupId"]
        parameters = {
            "Environment": "aws",
            "VpcId": vpc,
            "PublicSubnetIds": ",".join(subnets[:2]),
            "PrivateSubnetIds": ",".join(subnets[2:]),
            "PrivateRouteTableIds": route_table,
            "ArtifactBucket": BUCKET,
            "ArtifactPrefix": PREFIX,
            "CertificateArn": certificate,
            "BackendSecurityGroupId": cls.backends,
        }
        cfn = client("cloudformation")
        cfn.create_stack(
            StackName=STACK,
            TemplateBody=TEMPLATE.read_text(),
            Capabilities=["CAPABILITY_IAM"],
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        )
        cls.stack = cfn.describe_stacks(StackName=STACK)["Stacks"][0]
        cls.outputs = {o["OutputKey"]: o["OutputValue"] for o in cls.stack.get("Outputs", [])}
        cls.resources = {
            r["LogicalResourceId"]: r
            for r in cfn.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
        }

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def physical(self, logical):
        return self.resources[logical]["PhysicalResourceId"]

    def test_the_stack_is_created(self):
        self.assertEqual(self.stack["StackStatus"], "CREATE_COMPLETE", self.stack.get("StackStatusReason"))
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
        template = yaml.load(TEMPLATE.read_text(), Loader=Loader)
        expected = {
            name
            for name, r in template["Resources"].items()
            if r["Type"] not in EMULATOR_SKIPS and r.get("Condition") in (None, "IsAws", "HasBackendSecurityGroup")
        }
        self.assertEqual(expected - set(self.resources), set())
        self.assertTrue(self.outputs["GatewayUrl"].startswith("wss://"), self.outputs)

    def test_data_is_kept_and_queues_are_encrypted(self):
        table = self.aws("dynamodb").describe_table(TableName=self.outputs["TableName"])["Table"]
        self.assertTrue(table["DeletionProtectionEnabled"])
        self.assertEqual(table["StreamSpecification"]["StreamViewType"], "NEW_IMAGE")
        # (The emulator's CloudFormation does not apply TimeToLiveSpecification: rule E9004.)
        for output in ("PoisonQueueUrl", "FailureQueueUrl"):
            attributes = self.aws("sqs").get_queue_attributes(
                QueueUrl=self.outputs[output], AttributeNames=["All"])["Attributes"]
            self.assertEqual(attributes.get("SqsManagedSseEnabled"), "true", output)
        groups = self.aws("logs").describe_log_groups(logGroupNamePrefix=f"/chorus/{STACK}/")["logGroups"]
        self.assertEqual(len(groups), 4)
        self.assertTrue(all(g.get("retentionInDays") == 30 for g in groups), groups)

    def user_data(self, logical):
        import base64

        versions = self.aws("ec2").describe_launch_template_versions(
            LaunchTemplateId=self.physical(logical))["LaunchTemplateVersions"]
        return base64.b64decode(versions[-1]["LaunchTemplateData"]["UserData"]).decode()

    def test_gateways_check_the_audience_and_issuer_of_client_tokens(self):
        # The defaults: audience "chorus", issuer the stack's name (the emulator resolves the Fn::If).
        data = self.user_data("GatewayLaunchTemplate")
        self.assertIn("\nCHORUS_JWT_AUDIENCE=chorus\n", data)
        self.assertIn(f"\nCHORUS_JWT_ISSUER={STACK}\n", data)

    def test_gateways_and_writers_are_told_the_service_key(self):
        # (Their roles' access to it is checked with parliament on the resolved template: the
        # emulator keeps an AWS::NoValue in a policy as None where AWS drops it.)
        for template in ("GatewayLaunchTemplate", "WriterLaunchTemplate"):
            with self.subTest(template=template):
                data = self.user_data(template)
                self.assertIn("\nCHORUS_SERVICE_KEY_PARAMETER=/chorus/service-key\n", data)
                self.assertIn("\nCHORUS_SECOND_SERVICE_KEY_PARAMETER=\n", data)

    def test_the_writers_admit_gateways_and_the_backends_only(self):
        group = self.aws("ec2").describe_security_groups(
            GroupIds=[self.physical("WriterAlbSecurityGroup")])["SecurityGroups"][0]
        sources = {
            (p["FromPort"], pair["GroupId"]) for p in group["IpPermissions"] for pair in p.get("UserIdGroupPairs", [])
        }
        self.assertEqual(sources, {(80, self.physical("GatewaySecurityGroup")), (80, self.backends)})
        self.assertEqual([p.get("IpRanges") for p in group["IpPermissions"] if p.get("IpRanges")], [])

    def test_the_stream_is_retried_until_success(self):
        lam = self.aws("lambda")
        mappings = lam.list_event_source_mappings(FunctionName=self.outputs["PublisherFunctionName"])["EventSourceMappings"]
        self.assertEqual(len(mappings), 1)
        mapping = mappings[0]
        self.assertEqual(mapping.get("MaximumRetryAttempts"), -1)
        self.assertEqual(mapping.get("MaximumRecordAgeInSeconds"), -1)
        self.assertEqual(mapping.get("FunctionResponseTypes"), ["ReportBatchItemFailures"])

    def test_internals_are_not_on_the_internet(self):
        elb = self.aws("elbv2")
        https = elb.describe_listeners(ListenerArns=[self.physical("GatewayListenerHttps")])["Listeners"][0]
        self.assertEqual((https["Protocol"], https["Port"]), ("HTTPS", 443))
        self.assertEqual(https.get("SslPolicy"), "ELBSecurityPolicy-TLS13-1-2-2021-06")
        rules = elb.describe_rules(ListenerArn=https["ListenerArn"])["Rules"]
        hidden = {
            value
            for rule in rules
            if rule["Actions"][0]["Type"] == "fixed-response"
            for condition in rule["Conditions"]
            for value in condition.get("PathPatternConfig", {}).get("Values", condition.get("Values", []))
        }
        self.assertTrue({"/sns", "/metrics"} <= hidden, rules)
        redirect = elb.describe_listeners(ListenerArns=[self.physical("GatewayListenerRedirect")])["Listeners"][0]
        self.assertEqual(redirect["DefaultActions"][0]["Type"], "redirect")
        group = self.aws("ec2").describe_security_groups(GroupIds=[self.physical("GatewaySecurityGroup")])["SecurityGroups"][0]
        self.assertEqual([r.get("IpRanges") for r in group["IpPermissions"]], [[]])

    def test_cargo_lambda_deploy_keeps_the_stacks_configuration(self):
        lam = self.aws("lambda")
        name = self.outputs["PublisherFunctionName"]
        before = lam.get_function_configuration(FunctionName=name)
        self.assertEqual(before["Environment"]["Variables"]["CHORUS_TOPIC_ARN"], self.outputs["TopicArn"])
        self.assertEqual(before["TracingConfig"]["Mode"], "PassThrough")

        self.cargo_lambda_deploy(name, ROOT / "crates" / "publisher" / "Cargo.toml")

        after = lam.get_function_configuration(FunctionName=name)
        self.assertNotEqual(after["CodeSha256"], before["CodeSha256"], "the code was not replaced")
        for key in ("Environment", "TracingConfig", "MemorySize", "Timeout", "Role", "Architectures", "Handler"):
            self.assertEqual(after.get(key), before.get(key), key)

    def test_the_old_metadata_would_have_clobbered_it(self):
        """The harness can fail: the Cargo.toml metadata this issue replaced drops the topic ARN
        and the dead-letter queue (it also switched X-Ray on, which the emulator does not keep)."""
        lam = self.aws("lambda")
        name = self.outputs["PublisherFunctionName"]
        original = lam.get_function_configuration(FunctionName=name)
        package = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, package)
        (package / "src").mkdir()
        (package / "src" / "main.rs").write_text("fn main() {}\n")
        (package / "Cargo.toml").write_text(
            '[package]\nname = "chorus-publisher"\nversion = "0.1.0"\nedition = "2021"\n[workspace]\n'
            '[package.metadata.lambda.deploy]\nmemory = 256\ntimeout = 60\ntracing = "active"\n'
            '[package.metadata.lambda.deploy.env]\nCHORUS_LOG_FORMAT = "json"\nCHORUS_LOG = "info"\n'
        )
        try:
            self.cargo_lambda_deploy(name, package / "Cargo.toml")
            after = lam.get_function_configuration(FunctionName=name)
            self.assertNotIn("CHORUS_TOPIC_ARN", after["Environment"]["Variables"])
        finally:
            lam.update_function_configuration(
                FunctionName=name,
                Environment=original["Environment"],
                TracingConfig=original["TracingConfig"],
            )

    def cargo_lambda_deploy(self, function, manifest):
        # As after `cargo lambda build`: <lambda dir>/chorus-publisher/bootstrap. cargo-lambda reads
        # the package's metadata for the binary it is given by name.
        lambda_dir = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, lambda_dir)
        (lambda_dir / "chorus-publisher").mkdir()
        (lambda_dir / "chorus-publisher" / "bootstrap").write_bytes(elf(183) + os.urandom(16))
        venv_bin = pathlib.Path(sys.executable).parent
        cargo_lambda = shutil.which("cargo-lambda", path=str(venv_bin))
        if cargo_lambda is None:
            self.fail("cargo-lambda is not installed in .venv (scripts/lib.sh ensure_infra_tools)")
        result = subprocess.run(
            [cargo_lambda, "lambda", "deploy", function, "--manifest-path", str(manifest),
             "--binary-name", "chorus-publisher", "--lambda-dir", str(lambda_dir), "--endpoint-url", self.endpoint,
             "--region", "us-east-1"],
            env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"},
            capture_output=True, text=True, cwd=manifest.parent,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
