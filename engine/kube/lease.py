"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's
leaderelection does it: whoever holds an unexpired lease leads; the leader
renews every retry_period and steps down when it could not renew for
renew_deadline; the others take over once the lease has not changed for
leaseDurationSeconds. Expiry is judged by our own clock from when we last
saw the record change (observedTime), never by comparing clocks of nodes.
Updates carry the resourceVersion read, so two candidates cannot both win."""

import datetime
import logging
import random
import threading
import time

import urllib3

from .client import ApiError, path_for

log = logging.getLogger("engine.kube.lease")


def micro_time(t=None):
    """A MicroTime as the API server writes it."""
    t = t or datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client, namespace, name, identity, lease_duration=15.0, renew_deadline=10.0,
                 retry_period=2.0, on_started_leading=None, on_stopped_leading=None, on_new_leader=None):
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("want lease_duration > renew_deadline > retry_period > 0")
        self.client = client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.on_new_leader = on_new_leader
        self.path = path_for("Lease", namespace, name)
        self.leader = None                 # holderIdentity last seen
        self.is_leader = False
        self.transitions = 0               # times this elector became leader
        self._observed = None              # spec last seen
        self._observed_time = 0.0          # monotonic time it was first seen
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, release=True, timeout=10.0):
        """Stops; a leader gives the lease up so another takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if release and self.is_leader:
            self._release()
        self._set_leader(False)

    def run(self):
        while not self._stop.is_set():
            # acquire
            while not self._stop.is_set() and not self.try_acquire_or_renew():
                self._stop.wait(self.retry_period * random.uniform(1.0, 1.2))
            if self._stop.is_set():
                return
            self._set_leader(True)
            # renew until a renewal fails for renew_deadline
            last_renew = time.monotonic()
            while not self._stop.wait(self.retry_period):
                if self.try_acquire_or_renew():
                    last_renew = time.monotonic()
                elif time.monotonic() - last_renew > self.renew_deadline:
                    log.warning("lease %s/%s: could not renew for %.1fs; no longer the leader",
                                self.namespace, self.name, self.renew_deadline)
                    break
            if self._stop.is_set():
                return
            self._set_leader(False)

    def _set_leader(self, leading):
        if leading == self.is_leader:
            return
        self.is_leader = leading
        if leading:
            self.transitions += 1
            log.info("lease %s/%s: %s is the leader", self.namespace, self.name, self.identity)
            if self.on_started_leading:
                self.on_started_leading()
        elif self.on_stopped_leading:
            self.on_stopped_leading()

    def _seen(self, spec):
        if spec != self._observed:
            self._observed, self._observed_time = dict(spec), time.monotonic()
        holder = spec.get("holderIdentity") or None
        if holder != self.leader:
            self.leader = holder
            if self.on_new_leader and holder:
                self.on_new_leader(holder)

    def try_acquire_or_renew(self):
        """One attempt; True if we hold the lease afterwards."""
        now = micro_time()
        try:
            try:
                lease = self.client.get(self.path)
            except ApiError as e:
                if e.status != 404:
                    raise
                spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration),
                        "acquireTime": now, "renewTime": now, "leaseTransitions": 0}
                self.client.create(path_for("Lease", self.namespace),
                                   {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})
                self._seen(spec)
                return True
            spec = lease.get("spec") or {}
            self._seen(spec)
            holder = spec.get("holderIdentity")
            duration = spec.get("leaseDurationSeconds") or self.lease_duration
            if holder and holder != self.identity and time.monotonic() < self._observed_time + duration:
                return False
            new = dict(spec, holderIdentity=self.identity, leaseDurationSeconds=int(self.lease_duration),
                       renewTime=now)
            if holder != self.identity:
                new["acquireTime"] = now
                new["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
            lease["spec"] = new
            self.client.replace(self.path, lease)   # carries metadata.resourceVersion: 409 if it moved
            self._seen(new)
            return True
        except ApiError as e:
            if e.status != 409:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return False
        except (urllib3.exceptions.HTTPError, OSError) as e:
            log.warning("lease %s/%s: API server unreachable: %s", self.namespace, self.name, e)
            return False

    def _release(self):
        try:
            lease = self.client.get(self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            now = micro_time()
            lease["spec"] = dict(spec, holderIdentity=None, leaseDurationSeconds=1, renewTime=now, acquireTime=now)
            self.client.replace(self.path, lease)
        except (ApiError, urllib3.exceptions.HTTPError, OSError) as e:
            log.warning("lease %s/%s: could not release: %s", self.namespace, self.name, e)
