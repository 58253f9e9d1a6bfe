#!/usr/bin/env bash
# A release with Weir, for teams without Kubernetes: start the new instances, wait until they
# answer, hand them to Weir as the canary of the new revision, and let the rollout decide. The
# exit code says how it ended, so a CI job or a cron can branch on it.
#
#   deploy/deploy.sh SERVICE REVISION HOST:PORT[,HOST:PORT...]
#
# Environment:
#   WEIR_ADMIN_URL, WEIR_ADMIN_TOKEN   Weir's admin API and a token with the operator role
#   START_CMD    starts one new instance; run once per address with ADDRESS and REVISION set
#                (e.g. 'docker run -d --name "shop-$REVISION-${ADDRESS##*:}" -p "$ADDRESS:8080"
#                shop:"$REVISION"'); empty: the instances are already running
#   STOP_CMD     stops one instance the same way; used to clean up after a failed release
#   HEALTH_PATH  what each new instance must answer 2xx on before it gets traffic (/healthz)
#   READY_TIMEOUT  seconds to wait for that (60); ROLLOUT_TIMEOUT  the whole rollout (30m)
#   WEIR         how to run the weir command (weir)
#
# Exit codes, as weir rollout wait's: 0 promoted, 1 rolled back (the new instances are stopped),
# 2 usage or Weir unreachable, 3 timed out (the rollout is aborted), 4 paused for a person
# (promote with `weir promote SERVICE`, or abort with `weir abort SERVICE`).
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SERVICE REVISION HOST:PORT[,HOST:PORT...]" >&2
  exit 2
fi
service=$1 revision=$2 upstreams=$3
read -r -a weir <<< "${WEIR:-weir}"
IFS=, read -r -a addresses <<< "$upstreams"

log() { printf '%s deploy %s %s: %s\n' "$(date +%H:%M:%S)" "$service" "$revision" "$*" >&2; }

each_instance() {  # each_instance COMMAND: run it once per new address
  local command=$1 address
  [[ -n $command ]] || return 0
  for address in "${addresses[@]}"; do
    ADDRESS=$address REVISION=$revision bash -c "$command"
  done
}

# 1. The new instances, and nothing more until each one answers.
log "starting ${#addresses[@]} instance(s): $upstreams"
each_instance "${START_CMD:-}"
deadline=$((SECONDS + ${READY_TIMEOUT:-60}))
for address in "${addresses[@]}"; do
  until curl -fsS -o /dev/null --max-time 2 "http://$address${HEALTH_PATH:-/healthz}"; do
    if ((SECONDS >= deadline)); then
      log "$address never answered ${HEALTH_PATH:-/healthz}; no traffic was sent to it"
      each_instance "${STOP_CMD:-}"
      exit 1
    fi
    sleep 1
  done
done
log "all new instances answer; starting the rollout"

# 2. The rollout: Weir moves traffic step by step and judges the canary as it goes.
code=0
"${weir[@]}" rollout start "$service" --revision "$revision" --upstreams "$upstreams" \
  --wait --timeout "${ROLLOUT_TIMEOUT:-30m}" || code=$?

# 3. What the pipeline does with the outcome.
case $code in
  0) log "promoted: $revision has all the traffic" ;;
  1) log "rolled back: stable has the traffic again; stopping the new instances"
     each_instance "${STOP_CMD:-}" ;;
  3) log "timed out; aborting the rollout"
     "${weir[@]}" abort "$service" || true
     each_instance "${STOP_CMD:-}" ;;
  4) log "paused for a person: 'weir promote $service' goes on, 'weir abort $service' rolls back" ;;
  *) log "weir could not be asked (exit $code)" ;;
esac
exit "$code"
