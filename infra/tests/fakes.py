"""Fakes on 127.0.0.1 for the instance scripts' tests: the EC2 instance metadata service (IMDSv2)
and the two query-protocol AWS APIs the lifecycle watcher calls (Auto Scaling and Elastic Load
Balancing v2), answered by one stdlib HTTP server that records every call in order."""

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ELB_NS = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"
ASG_NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


class FakeAws:
    """IMDS + Auto Scaling + ELBv2. `events` is the ordered log of what the watcher did."""

    def __init__(self, instance_id, polls_before_terminated=3, unhealthy_after=1, hook_opens_after=2):
        self.instance_id = instance_id
        self.polls_before_terminated = polls_before_terminated
        self.unhealthy_after = unhealthy_after  # DescribeTargetHealth calls answering "healthy"
        self.hook_opens_after = hook_opens_after  # CompleteLifecycleAction calls refused first
        self.events = []
        self.calls = []
        self.tokens = set()
        self.state_polls = 0
        self.health_calls = 0
        self.hook_calls = 0
        self.deregistered = False
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, content_type="text/xml"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    token = f"token-{len(fake.tokens)}"
                    fake.tokens.add(token)
                    return self._send(200, token, "text/plain")
                return self._send(400, "bad token request", "text/plain")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                    return self._send(401, "", "text/plain")  # IMDSv2 only
                if self.path == "/latest/meta-data/autoscaling/target-lifecycle-state":
                    with fake.lock:
                        fake.state_polls += 1
                        state = "Terminated" if fake.state_polls > fake.polls_before_terminated else "InService"
                        if state == "Terminated" and "imds:Terminated" not in fake.events:
                            fake._event("imds:Terminated")
                    return self._send(200, state, "text/plain")
                return self._send(404, "", "text/plain")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                params = {k: v[0] for k, v in form.items()}
                if self.path == "/_test/stop":
                    with fake.lock:
                        fake._event("stop")
                    return self._send(200, "stopped", "text/plain")
                action = params.get("Action")
                with fake.lock:
                    fake.calls.append(params)
                    status, body = fake._answer(action, params)
                return self._send(status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _event(self, name):
        self.events.append(name)
        self.last_progress = time.monotonic()

    def _answer(self, action, params):
        if action == "DeregisterTargets":
            self.deregistered = True
            self._event("DeregisterTargets")
            return 200, (
                f'<DeregisterTargetsResponse xmlns="{ELB_NS}"><DeregisterTargetsResult/>'
                "<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></DeregisterTargetsResponse>"
            )
        if action == "DescribeTargetHealth":
            self.health_calls += 1
            state = "healthy" if not self.deregistered or self.health_calls <= self.unhealthy_after else "draining"
            self._event(f"DescribeTargetHealth:{state}")
            return 200, (
                f'<DescribeTargetHealthResponse xmlns="{ELB_NS}"><DescribeTargetHealthResult>'
                "<TargetHealthDescriptions><member>"
                f"<Target><Id>{self.instance_id}</Id><Port>8081</Port></Target>"
                f"<TargetHealth><State>{state}</State></TargetHealth>"
                "</member></TargetHealthDescriptions></DescribeTargetHealthResult>"
                "<ResponseMetadata><RequestId>2</RequestId></ResponseMetadata></DescribeTargetHealthResponse>"
            )
        if action == "CompleteLifecycleAction":
            self.hook_calls += 1
            if self.hook_calls <= self.hook_opens_after:
                self._event("CompleteLifecycleAction:refused")
                return 400, (
                    f'<ErrorResponse xmlns="{ASG_NS}"><Error><Type>Sender</Type><Code>ValidationError</Code>'
                    f"<Message>No active Lifecycle Action found with instance ID {self.instance_id}</Message>"
                    "</Error><RequestId>3</RequestId></ErrorResponse>"
                )
            self._event("CompleteLifecycleAction:ok")
            return 200, (
                f'<CompleteLifecycleActionResponse xmlns="{ASG_NS}"><CompleteLifecycleActionResult/>'
                "<ResponseMetadata><RequestId>4</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>"
            )
        self._event(f"unexpected:{action}")
        return 400, f'<ErrorResponse><Error><Code>InvalidAction</Code><Message>{action}</Message></Error></ErrorResponse>'

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def wait_for_exit(process, fake, quiet_secs=30):
    """Waits for `process` to exit while the fake sees progress; fails when nothing happened for
    `quiet_secs` (the machine may be busy: only a stall counts, not the total time)."""
    while process.poll() is None:
        if time.monotonic() - fake.last_progress > quiet_secs:
            process.kill()
            raise AssertionError(
                f"no progress for {quiet_secs} s; events so far: {fake.events} (awaited the next step)"
            )
        time.sleep(0.1)
    return process.returncode
