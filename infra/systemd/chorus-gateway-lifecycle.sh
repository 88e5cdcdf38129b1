#!/usr/bin/env bash
# chorus-gateway-lifecycle.sh ASG_NAME INSTANCE_ID — run on each gateway instance (user data).
# When Auto Scaling marks the instance for termination (lifecycle hook "drain"), stop the gateway
# unit (SIGTERM: unsubscribe, close clients with 4000 so they resume elsewhere), then let the
# instance go. Uses IMDSv2 and the AWS CLI.
set -uo pipefail
asg=$1 instance=$2
imds=http://169.254.169.254/latest
while true; do
  token=$(curl -fsS -X PUT "$imds/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') || { sleep 5; continue; }
  state=$(curl -fsS -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/autoscaling/target-lifecycle-state" || true)
  if [ "$state" = "Terminated" ]; then
    systemctl stop chorus-gateway
    aws autoscaling complete-lifecycle-action --lifecycle-hook-name drain \
      --auto-scaling-group-name "$asg" --instance-id "$instance" --lifecycle-action-result CONTINUE
    exit 0
  fi
  sleep 5
done
