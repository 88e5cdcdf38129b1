"""The instance side of the stack, run here: the lifecycle watcher against a fake instance-metadata
service and fake Auto Scaling / ELB APIs (order: ALB deregistration -> drain -> complete the hook),
and what chorus-bootstrap writes (the unit's TimeoutStopSec derived from the drain)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import fakes

ROOT = pathlib.Path(__file__).resolve().parents[2]
WATCHER = ROOT / "infra" / "instance" / "chorus-lifecycle-watcher"
BOOTSTRAP = ROOT / "infra" / "instance" / "chorus-bootstrap"
INSTANCE = "i-0123456789abcdef0"
TARGET_GROUP = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/chorus-gw/0123456789abcdef"


def aws_env(url):
    env = dict(os.environ)
    env.update(
        PATH=f"{pathlib.Path(sys.executable).parent}:{env.get('PATH', '')}",
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_MAX_ATTEMPTS="1",
    )
    return env


class LifecycleWatcher(unittest.TestCase):
    def run_watcher(self, fake):
        env = aws_env(fake.url)
        env.update(
            CHORUS_ASG="chorus-gateways",
            CHORUS_INSTANCE_ID=INSTANCE,
            CHORUS_TARGET_GROUP_ARN=TARGET_GROUP,
            CHORUS_STOP_COMMAND=f"curl -fsS -o /dev/null -X POST {fake.url}/_test/stop",
            CHORUS_IMDS_URL=fake.url,
            CHORUS_POLL_SECS="0.1",
        )
        process = subprocess.Popen([str(WATCHER)], env=env, stderr=subprocess.PIPE, text=True)
        rc = fakes.wait_for_exit(process, fake)
        return rc, process.stderr.read()

    def test_deregisters_then_drains_then_completes_the_hook(self):
        with fakes.FakeAws(INSTANCE, polls_before_terminated=3, unhealthy_after=2, hook_opens_after=2) as fake:
            rc, log = self.run_watcher(fake)
        self.assertEqual(rc, 0, log)
        self.assertEqual(
            fake.events,
            [
                "imds:Terminated",
                "DeregisterTargets",
                "DescribeTargetHealth:healthy",
                "DescribeTargetHealth:healthy",
                "DescribeTargetHealth:draining",
                "stop",
                "CompleteLifecycleAction:refused",
                "CompleteLifecycleAction:refused",
                "CompleteLifecycleAction:ok",
            ],
            log,
        )
        # Nothing happened while the target state was InService.
        self.assertGreater(fake.state_polls, 3)
        deregister = next(c for c in fake.calls if c["Action"] == "DeregisterTargets")
        self.assertEqual(deregister["TargetGroupArn"], TARGET_GROUP)
        self.assertEqual(deregister["Targets.member.1.Id"], INSTANCE)
        complete = [c for c in fake.calls if c["Action"] == "CompleteLifecycleAction"][-1]
        self.assertEqual(
            {k: complete[k] for k in ("LifecycleHookName", "AutoScalingGroupName", "InstanceId", "LifecycleActionResult")},
            {
                "LifecycleHookName": "drain",
                "AutoScalingGroupName": "chorus-gateways",
                "InstanceId": INSTANCE,
                "LifecycleActionResult": "CONTINUE",
            },
        )

    def test_a_failed_stop_still_lets_the_instance_go(self):
        with fakes.FakeAws(INSTANCE, polls_before_terminated=0, unhealthy_after=0, hook_opens_after=0) as fake:
            env_stop = "false"
            env = aws_env(fake.url)
            env.update(
                CHORUS_ASG="chorus-gateways",
                CHORUS_INSTANCE_ID=INSTANCE,
                CHORUS_TARGET_GROUP_ARN=TARGET_GROUP,
                CHORUS_STOP_COMMAND=env_stop,
                CHORUS_IMDS_URL=fake.url,
                CHORUS_POLL_SECS="0.1",
            )
            process = subprocess.Popen([str(WATCHER)], env=env, stderr=subprocess.PIPE, text=True)
            rc = fakes.wait_for_exit(process, fake)
        self.assertEqual(rc, 0)
        self.assertEqual(fake.events[-1], "CompleteLifecycleAction:ok")
        self.assertIn("stopping the gateway failed", process.stderr.read())


class Bootstrap(unittest.TestCase):
    GATEWAY = {
        "CHORUS_ROLE": "gateway",
        "CHORUS_STACK": "chorus",
        "CHORUS_STACK_RESOURCE": "GatewayGroup",
        "CHORUS_REGION": "us-east-1",
        "CHORUS_ARTIFACTS": "s3://bucket/chorus/abc/arm64",
        "CHORUS_ASG": "chorus-gateways",
        "CHORUS_TARGET_GROUP_ARN": TARGET_GROUP,
        "CHORUS_TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:chorus-messages",
        "CHORUS_WRITER_URL": "http://internal-writer.example",
        "CHORUS_DRAIN_TIMEOUT_SECS": "30",
        "CHORUS_JWT_SECRET_PARAMETER": "/chorus/jwt-secret",
        "CHORUS_JWT_AUDIENCE": "chorus",
        "CHORUS_JWT_ISSUER": "chorus",
        "CHORUS_SERVICE_KEY_PARAMETER": "/chorus/service-key",
        "CHORUS_SECOND_SERVICE_KEY_PARAMETER": "",
        "CHORUS_LOG_GROUP": "/chorus/chorus/gateway",
    }
    WRITER = {
        "CHORUS_ROLE": "writer",
        "CHORUS_STACK": "chorus",
        "CHORUS_STACK_RESOURCE": "WriterGroup",
        "CHORUS_REGION": "us-east-1",
        "CHORUS_ARTIFACTS": "s3://bucket/chorus/abc/arm64",
        "CHORUS_TABLE": "chorus-messages",
        "CHORUS_SERVICE_KEY_PARAMETER": "/chorus/service-key",
        "CHORUS_SECOND_SERVICE_KEY_PARAMETER": "",
        "CHORUS_LOG_GROUP": "/chorus/chorus/writer",
    }

    def run_bootstrap(self, settings):
        """chorus-bootstrap in render mode on an env file of `settings` (None values left out)."""
        directory = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        env_file = directory / "bootstrap.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items() if v is not None))
        out = directory / "root"
        result = subprocess.run(
            [str(BOOTSTRAP), str(env_file)], env={**os.environ, "CHORUS_RENDER_ONLY": str(out)},
            capture_output=True, text=True,
        )
        return result, out

    def render(self, drain=30, role="gateway", **changes):
        base = self.GATEWAY if role == "gateway" else self.WRITER
        settings = {**base, **({"CHORUS_DRAIN_TIMEOUT_SECS": str(drain)} if role == "gateway" else {}), **changes}
        result, out = self.run_bootstrap(settings)
        self.assertEqual(result.returncode, 0, result.stderr)
        return out

    def service_key_settings(self, root, service):
        """(credentials loaded, the variable naming the key files, its value) from the unit and
        the bootstrap's drop-in, in the order systemd applies them."""
        unit = (ROOT / "infra/systemd" / f"{service}.service").read_text()
        dropin = (root / f"etc/systemd/system/{service}.service.d/20-service-key.conf").read_text()
        credentials = re.findall(r"^LoadCredential=(service-key[^:]*):(\S+)$", unit + dropin, re.M)
        assignments = re.findall(r"^Environment=(CHORUS_(?:SERVICE|WRITER)_KEY_FILE)=(\S+)$", unit + dropin, re.M)
        variables = {name for name, _ in assignments}
        self.assertEqual(len(variables), 1, assignments)
        return credentials, assignments[-1][0], assignments[-1][1]

    def test_stop_timeout_is_derived_from_the_drain(self):
        for drain in (5, 30, 240):
            with self.subTest(drain=drain):
                root = self.render(drain)
                env = (root / "etc/chorus/gateway.env").read_text()
                self.assertIn(f"CHORUS_DRAIN_TIMEOUT_MS={drain * 1000}\n", env)
                self.assertIn("CHORUS_BUS=sqs\n", env)
                self.assertIn(f"CHORUS_GATEWAY_ID=chorus-{INSTANCE}\n", env)
                self.assertIn("CHORUS_GATEWAY_METRICS_LISTEN=127.0.0.1:9101\n", env)
                dropin = (root / "etc/systemd/system/chorus-gateway.service.d/10-drain.conf").read_text()
                stop = int(re.search(r"^TimeoutStopSec=(\d+)$", dropin, re.M).group(1))
                self.assertGreater(stop, drain)
                # The ALB keeps the target 300 s: the unit must be stopped well within it.
                self.assertLess(stop + 5, 300)
                lifecycle = (root / "etc/chorus/lifecycle.env").read_text()
                self.assertIn(f"CHORUS_TARGET_GROUP_ARN={TARGET_GROUP}\n", lifecycle)

    def test_client_tokens_must_name_the_stacks_audience_and_issuer(self):
        root = self.render(CHORUS_JWT_AUDIENCE="chorus", CHORUS_JWT_ISSUER="chorus-staging")
        env = (root / "etc/chorus/gateway.env").read_text()
        self.assertIn("CHORUS_JWT_AUDIENCE=chorus\n", env)
        self.assertIn("CHORUS_JWT_ISSUER=chorus-staging\n", env)

    def test_a_gateway_without_audience_or_issuer_is_not_set_up(self):
        for missing in ("CHORUS_JWT_AUDIENCE", "CHORUS_JWT_ISSUER"):
            for value in (None, ""):
                with self.subTest(missing=missing, value=value):
                    result, root = self.run_bootstrap({**self.GATEWAY, missing: value})
                    self.assertNotEqual(result.returncode, 0)
                    self.assertIn("client tokens need an", result.stderr)
                    self.assertFalse((root / "etc/chorus/gateway.env").exists())

    def test_both_services_get_the_service_key_as_a_credential(self):
        for role, service, variable in (
            ("gateway", "chorus-gateway", "CHORUS_WRITER_KEY_FILE"),
            ("writer", "chorus-writer", "CHORUS_SERVICE_KEY_FILE"),
        ):
            with self.subTest(role=role, keys="one"):
                root = self.render(role=role)
                credentials, name, value = self.service_key_settings(root, service)
                self.assertEqual(credentials, [("service-key", "/etc/chorus/service-key")])
                self.assertEqual((name, value), (variable, "%d/service-key"))
            with self.subTest(role=role, keys="rotation"):
                root = self.render(role=role, CHORUS_SECOND_SERVICE_KEY_PARAMETER="/chorus/service-key-2")
                credentials, name, value = self.service_key_settings(root, service)
                self.assertEqual(credentials, [
                    ("service-key", "/etc/chorus/service-key"),
                    ("service-key-second", "/etc/chorus/service-key-second"),
                ])
                # The first signs: the stack's ServiceKeyParameter stays first.
                self.assertEqual((name, value), (variable, "%d/service-key,%d/service-key-second"))
            # The secrets themselves are never in the service's environment file.
            env = (root / f"etc/chorus/{role}.env").read_text()
            self.assertNotIn("KEY_FILE", env)

    def test_the_writer_signs_with_the_first_key_the_drop_in_names(self):
        """The real writer, given CHORUS_SERVICE_KEY_FILE as the rotation drop-in sets it (with
        %d the credentials directory, the files as the bootstrap fetches them: the value and a
        newline), signs backend tokens (mint-token) with ServiceKeyParameter's key."""
        import base64
        import hashlib
        import hmac

        binaries = pathlib.Path(os.environ.get("CHORUS_BIN_DIR", ROOT / "target" / "debug"))
        if not (binaries / "chorus-writer").exists():
            self.skipTest(f"no chorus-writer in {binaries} (build it, or set CHORUS_BIN_DIR)")
        root = self.render(role="writer", CHORUS_SECOND_SERVICE_KEY_PARAMETER="/chorus/service-key-2")
        _, name, value = self.service_key_settings(root, "chorus-writer")
        credentials = root / "credentials"
        credentials.mkdir()
        keys = {"service-key": base64.b64encode(os.urandom(48)), "service-key-second": base64.b64encode(os.urandom(48))}
        for file, key in keys.items():
            (credentials / file).write_bytes(key + b"\n")
        result = subprocess.run(
            [str(binaries / "chorus-writer"), "mint-token", "--sub", "billing", "--rooms", "orders-*", "--senders", "billing"],
            env={**os.environ, name: value.replace("%d", str(credentials))}, capture_output=True, text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        header, payload, signature = result.stdout.strip().split(".")

        def sign(key):
            digest = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

        self.assertEqual(signature, sign(keys["service-key"]))
        self.assertNotEqual(signature, sign(keys["service-key-second"]))

    def test_no_instance_is_set_up_without_a_service_key(self):
        for base in (self.GATEWAY, self.WRITER):
            with self.subTest(role=base["CHORUS_ROLE"]):
                result, root = self.run_bootstrap({**base, "CHORUS_SERVICE_KEY_PARAMETER": None})
                self.assertNotEqual(result.returncode, 0)
                self.assertIn("service key", result.stderr)
                self.assertFalse((root / f"etc/chorus/{base['CHORUS_ROLE']}.env").exists())

    def test_cloudwatch_agent_config_ships_logs_and_the_scaling_metric(self):
        import json

        import yaml

        root = self.render(30)
        agent = json.loads((root / "etc/chorus/cloudwatch/agent.json").read_text())
        collected = agent["logs"]["logs_collected"]
        files = collected["files"]["collect_list"]
        self.assertEqual([f["file_path"] for f in files], ["/var/log/chorus/chorus-gateway.log"])
        self.assertEqual({f["log_group_name"] for f in files}, {"/chorus/chorus/gateway"})
        emf = collected["prometheus"]["emf_processor"]
        self.assertEqual(emf["metric_namespace"], "Chorus")
        declaration = emf["metric_declaration"][0]
        self.assertEqual(declaration["dimensions"], [["AutoScalingGroupName"]])
        self.assertTrue(any(re.fullmatch(p, "chorus_gateway_connections") for p in declaration["metric_selectors"]))
        scrape = yaml.safe_load((root / "etc/chorus/cloudwatch/prometheus.yaml").read_text())["scrape_configs"][0]
        self.assertTrue(re.fullmatch(declaration["label_matcher"], scrape["job_name"]))
        target = scrape["static_configs"][0]
        # The series the scaling policy reads: namespace Chorus, dimension = the gateway group.
        self.assertEqual(target["labels"], {"AutoScalingGroupName": "chorus-gateways"})
        self.assertEqual(target["targets"], ["127.0.0.1:9101"])
        env = (root / "etc/chorus/gateway.env").read_text()
        self.assertIn("CHORUS_GATEWAY_METRICS_LISTEN=127.0.0.1:9101\n", env)

    def test_units_with_the_drop_in_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        binaries = pathlib.Path(os.environ.get("CHORUS_BIN_DIR", ROOT / "target" / "debug"))
        if not (binaries / "chorus-gateway").exists():
            self.skipTest(f"no chorus-gateway in {binaries} (build it, or set CHORUS_BIN_DIR)")
        second = {"CHORUS_SECOND_SERVICE_KEY_PARAMETER": "/chorus/service-key-2"}
        root = self.render(30, **second)
        writer_root = self.render(role="writer", **second)
        units = root / "units"
        units.mkdir()
        for unit in ("chorus-gateway.service", "chorus-writer.service", "chorus-lifecycle-watcher.service",
                     "chorus-journal-export@.service"):
            text = (ROOT / "infra/systemd" / unit).read_text()
            text = text.replace("/usr/local/bin/", f"{binaries}/").replace("/usr/local/sbin/", f"{ROOT}/infra/instance/")
            (units / unit).write_text(text)
        shutil.copytree(root / "etc/systemd/system/chorus-gateway.service.d", units / "chorus-gateway.service.d")
        shutil.copytree(writer_root / "etc/systemd/system/chorus-writer.service.d", units / "chorus-writer.service.d")
        result = subprocess.run(
            [analyze, "verify", "chorus-gateway.service", "chorus-writer.service", "chorus-lifecycle-watcher.service",
             "chorus-journal-export@chorus-gateway.service"],
            cwd=units, capture_output=True, text=True,
        )
        ours = [line for line in (result.stdout + result.stderr).splitlines() if "chorus-" in line]
        self.assertEqual(ours, [], "\n".join(ours))


if __name__ == "__main__":
    unittest.main()
