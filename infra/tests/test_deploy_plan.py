"""`scripts/deploy --dry-run`: a complete plan, the same plan every time for the same source, and a
new immutable artifact prefix for any other source (a commit, or a dirty tree's changes). Runs on
a throw-away git repository holding this checkout's current files, so the tree is clean exactly
when the test says so."""

import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARGS = ["--dry-run", "--skip-build", "--bucket", "example-bucket", "--", "VpcId=vpc-0123abcd"]


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


class DeployPlan(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.repo = pathlib.Path(tempfile.mkdtemp()) / "chorus"
        files = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
        for name in filter(None, files):
            source = ROOT / name
            if not source.is_file():
                continue  # deleted in the work tree
            target = cls.repo / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        git(cls.repo.parent, "init", "-q", str(cls.repo))
        git(cls.repo, "add", "-A")
        git(cls.repo, "-c", "user.name=test", "-c", "user.email=test@invalid", "commit", "-q", "-m", "release")
        cls.commit = git(cls.repo, "rev-parse", "--short=12", "HEAD").strip()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.repo.parent)

    def plan(self, *extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        result = subprocess.run(
            [str(self.repo / "scripts" / "deploy"), *ARGS[:-2], *extra, *ARGS[-2:]],
            cwd=self.repo, env=env, capture_output=True, text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def prefix(self, plan):
        return re.search(r"artifacts in s3://example-bucket/(\S+)/$", plan, re.M).group(1)

    def dirty(self, text):
        (self.repo / "README.md").write_text((self.repo / "README.md").read_text() + text)
        self.addCleanup(git, self.repo, "checkout", "-q", "--", "README.md")

    def test_the_plan_is_complete(self):
        plan = self.plan()
        for step in [
            "--key chorus/", "/publisher.zip", "/janitor.zip", "/chorus-gateway", "/chorus-writer",
            "/instance/chorus-bootstrap", "/instance/chorus-lifecycle-watcher",
            "/systemd/chorus-gateway.service", "/systemd/chorus-lifecycle-watcher.service",
            "--if-none-match", "ssm put-parameter --name /chorus/jwt-secret", "4. Service key",
            "aws cloudformation deploy", "--no-fail-on-empty-changeset", "Environment=aws",
            "ArtifactPrefix=chorus/", "Architecture=arm64", "JwtSecretParameter=/chorus/jwt-secret",
            "VpcId=vpc-0123abcd", "--publisher-only",
        ]:
            self.assertIn(step, plan)
        self.assertNotIn("put-object --bucket example-bucket --key chorus/latest", plan)
        # Every upload lands under the release prefix, and nothing is copied over a key.
        self.assertNotIn("aws s3 cp", plan)

    def test_the_service_key_is_created_and_otherwise_left_to_the_stack(self):
        plan = self.plan()
        self.assertIn("4. Service key", plan)
        self.assertIn("ssm put-parameter --name <ServiceKeyParameter of the stack, or /chorus/service-key for a new stack>", plan)
        # Not given, not overridden: a plain deploy after a rotation keeps the stack's keys (the
        # CLI reuses a parameter's previous value) instead of going back to the default one.
        self.assertNotIn("ServiceKeyParameter=", plan)

    def test_a_rotation_creates_the_new_key_and_passes_both(self):
        steps = {
            "add": (["--second-service-key-parameter", "/chorus/service-key-2"],
                    ["/chorus/service-key-2"], ["SecondServiceKeyParameter=/chorus/service-key-2"]),
            "make it first": (["--service-key-parameter", "/chorus/service-key-2",
                               "--second-service-key-parameter", "/chorus/service-key"],
                              ["/chorus/service-key-2", "/chorus/service-key"],
                              ["ServiceKeyParameter=/chorus/service-key-2", "SecondServiceKeyParameter=/chorus/service-key"]),
            "remove the old": (["--second-service-key-parameter", ""], [], ["SecondServiceKeyParameter="]),
        }
        for step, (args, created, overrides) in steps.items():
            with self.subTest(step=step):
                plan = self.plan(*args)
                deploy = next(line for line in plan.splitlines() if "aws cloudformation deploy" in line).split()
                for name in created:
                    self.assertIn(f"ssm put-parameter --name {name} --type SecureString", plan)
                self.assertEqual([a for a in deploy if "ServiceKeyParameter=" in a], overrides)
                if step == "remove the old":
                    self.assertNotIn("SecondServiceKeyParameter of the stack", plan)
                    self.assertEqual(plan.count("ssm put-parameter"), 2, plan)  # client secret + first key

    def test_a_clean_tree_gives_the_same_plan_twice(self):
        first, second = self.plan(), self.plan()
        self.assertEqual(first, second)
        self.assertEqual(self.prefix(first), f"chorus/{self.commit}/arm64")

    def test_a_dirty_tree_gets_its_own_prefix_and_the_same_plan_twice(self):
        clean = self.prefix(self.plan())
        self.dirty("\nlocal change one\n")
        first, second = self.plan(), self.plan()
        self.assertEqual(first, second)
        dirty_one = self.prefix(first)
        self.assertRegex(dirty_one, rf"^chorus/{self.commit}-dirty-[0-9a-f]{{12}}/arm64$")
        self.assertNotEqual(dirty_one, clean)
        self.dirty("\nlocal change two\n")
        self.assertNotEqual(self.prefix(self.plan()), dirty_one)

    def test_an_untracked_file_counts_as_a_change(self):
        clean = self.prefix(self.plan())
        scratch = self.repo / "scratch.txt"
        scratch.write_text("not committed\n")
        self.addCleanup(scratch.unlink)
        self.assertNotEqual(self.prefix(self.plan()), clean)

    def test_the_architecture_is_part_of_the_prefix(self):
        plan = self.plan("--arch", "x86_64")
        self.assertTrue(self.prefix(plan).endswith("/x86_64"))
        self.assertIn("Architecture=x86_64", plan)


if __name__ == "__main__":
    unittest.main()
