{{/*
Checks across values that the JSON schema cannot express, each failing the render with a
message naming the values to change. The services would refuse most of these at startup;
failing here says so before anything is deployed.
*/}}
{{- define "vigil.validate" -}}
{{- $v := .Values -}}

{{- if and $v.kafka.sasl.enabled (not $v.kafka.sasl.existingSecret) -}}
{{- fail "kafka.sasl.enabled needs kafka.sasl.existingSecret: a Secret holding the SASL username and password" -}}
{{- end -}}
{{- if ne (empty $v.kafka.tls.certKey) (empty $v.kafka.tls.keyKey) -}}
{{- fail "kafka.tls: give both certKey and keyKey (mutual TLS), or neither" -}}
{{- end -}}
{{- if and $v.kafka.tls.enabled $v.kafka.tls.certKey (not $v.kafka.tls.existingSecret) -}}
{{- fail "kafka.tls.certKey needs kafka.tls.existingSecret: the Secret holding the client certificate and key" -}}
{{- end -}}
{{- if and $v.mqtt.auth.enabled (not $v.mqtt.auth.existingSecret) -}}
{{- fail "mqtt.auth.enabled needs mqtt.auth.existingSecret: a Secret holding the MQTT username and password" -}}
{{- end -}}
{{- if ne (empty $v.mqtt.tls.certKey) (empty $v.mqtt.tls.keyKey) -}}
{{- fail "mqtt.tls: give both certKey and keyKey (mutual TLS), or neither" -}}
{{- end -}}
{{- if and $v.mqtt.tls.existingSecret (not (hasPrefix "mqtts://" $v.mqtt.url)) -}}
{{- fail (printf "mqtt.tls.existingSecret is set but mqtt.url %q is not an mqtts:// URL, so ingest would not use TLS" $v.mqtt.url) -}}
{{- end -}}
{{- if and $v.mqtt.tls.certKey (not $v.mqtt.tls.existingSecret) -}}
{{- fail "mqtt.tls.certKey needs mqtt.tls.existingSecret: the Secret holding the client certificate and key" -}}
{{- end -}}

{{- $deviceTls := $v.ingest.deviceTls -}}
{{- if and (eq $v.ingest.config.mqtt_proxy.device_id_from "certificate-cn") (not (and $deviceTls.existingSecret (eq $deviceTls.clientCertificates "required"))) -}}
{{- fail "ingest.config.mqtt_proxy.device_id_from certificate-cn needs ingest.deviceTls.existingSecret with clientCertificates required: the identity is the verified device certificate's common name" -}}
{{- end -}}

{{- $msSecurity := $v.modelServer.security -}}
{{- if $v.modelServer.enabled -}}
{{- if and $msSecurity.tls.enabled (eq $msSecurity.tls.source "secret") (not $msSecurity.tls.existingSecret) -}}
{{- fail "modelServer.security.tls.source secret needs modelServer.security.tls.existingSecret: a kubernetes.io/tls Secret (tls.crt, tls.key and the CA)" -}}
{{- end -}}
{{- if and $msSecurity.tls.enabled (eq $msSecurity.tls.source "certManager") (not $msSecurity.tls.certManager.issuerRef.name) -}}
{{- fail "modelServer.security.tls.source certManager needs modelServer.security.tls.certManager.issuerRef.name: the cert-manager Issuer or ClusterIssuer to request the certificate from" -}}
{{- end -}}
{{- if and $msSecurity.allowedSubjects (not $msSecurity.tls.enabled) -}}
{{- fail "modelServer.security.allowedSubjects needs modelServer.security.tls.enabled: subjects are read from verified client certificates" -}}
{{- end -}}
{{- if and $msSecurity.tls.existingSecret (ne $msSecurity.tls.source "secret") -}}
{{- fail (printf "modelServer.security.tls.existingSecret is set but tls.source is %q, which would not use it: set source: secret" $msSecurity.tls.source) -}}
{{- end -}}
{{- end -}}

{{- range $name, $component := dict "modelServer" $v.modelServer "streamProcessor" $v.streamProcessor "alerts" $v.alerts "ingest" $v.ingest -}}
{{- $pdb := $component.podDisruptionBudget -}}
{{- if $pdb.enabled -}}
{{- if and (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) -}}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable" $name) -}}
{{- end -}}
{{- end -}}
{{- if and $component.autoscaling.enabled (gt (int $component.autoscaling.minReplicas) (int $component.autoscaling.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is above maxReplicas (%d)" $name (int $component.autoscaling.minReplicas) (int $component.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}

{{- $ms := $v.modelServer -}}
{{- if $ms.enabled -}}
{{- if and (eq $ms.modelSource.type "pvc") (not $ms.modelSource.pvc.claimName) -}}
{{- fail "modelServer.modelSource.type is pvc: set modelServer.modelSource.pvc.claimName" -}}
{{- end -}}
{{- $models := dict -}}
{{- range (include "vigil.modelServer.models" $ | fromYamlArray) -}}
{{- if hasKey $models .name -}}
{{- fail (printf "modelServer.models: model %q is listed twice" .name) -}}
{{- end -}}
{{- $_ := set $models .name . -}}
{{- if and (eq .versionPolicy "specific") (empty .versions) -}}
{{- fail (printf "modelServer.models: model %q has versionPolicy specific but no versions" .name) -}}
{{- end -}}
{{- end -}}
{{- $rolloutModels := dict -}}
{{- range $ms.rollouts -}}
{{- $rollout := . -}}
{{- if hasKey $rolloutModels $rollout.model -}}
{{- fail (printf "modelServer.rollouts: model %q has two rollouts" $rollout.model) -}}
{{- end -}}
{{- $_ := set $rolloutModels $rollout.model true -}}
{{- if not (hasKey $models $rollout.model) -}}
{{- fail (printf "modelServer.rollouts: model %q is not in modelServer.models" $rollout.model) -}}
{{- end -}}
{{- if eq (int64 $rollout.stable) (int64 $rollout.canary) -}}
{{- fail (printf "modelServer.rollouts: model %q: stable and canary are both version %d" $rollout.model (int64 $rollout.stable)) -}}
{{- end -}}
{{- $model := get $models $rollout.model -}}
{{- if eq $model.versionPolicy "specific" -}}
{{- $served := list -}}
{{- range $model.versions -}}{{- $served = append $served (int64 .) -}}{{- end -}}
{{- range $version := list $rollout.stable $rollout.canary -}}
{{- if not (has (int64 $version) $served) -}}
{{- fail (printf "modelServer.rollouts: model %q: version %d is not in the model's versions %v, so it would not be loaded" $rollout.model (int64 $version) $served) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $model.versionPolicy "latest") (lt (int $model.numVersions) 2) -}}
{{- fail (printf "modelServer.rollouts: model %q has versionPolicy latest with numVersions %d, which cannot serve both stable and canary; use all, specific, or numVersions >= 2" $rollout.model (int $model.numVersions)) -}}
{{- end -}}
{{- with $rollout.analysis -}}
{{- $previous := 0.0 -}}
{{- range $i, $step := .step_weights_percent | default list -}}
{{- if le (float64 $step) $previous -}}
{{- fail (printf "modelServer.rollouts: model %q: analysis.step_weights_percent[%d] (%v) does not ascend" $rollout.model $i $step) -}}
{{- end -}}
{{- $previous = float64 $step -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $rollout "analysis") (not $ms.rolloutState.kafka.enabled) (or (gt (int $ms.replicaCount) 1) $ms.autoscaling.enabled) -}}
{{- fail (printf "modelServer.rollouts: model %q has an analysis plan and the model server runs more than one replica, but modelServer.rolloutState.kafka is off: every replica would judge and step the canary on its own. Enable modelServer.rolloutState.kafka, or run one replica" $rollout.model) -}}
{{- end -}}
{{- end -}}
{{- if $ms.enableBatching -}}
{{- $sizes := $ms.batching.allowedBatchSizes -}}
{{- if $sizes -}}
{{- if ne (int64 (last $sizes)) (int64 $ms.batching.maxBatchSize) -}}
{{- fail (printf "modelServer.batching: the last of allowedBatchSizes (%d) must equal maxBatchSize (%d)" (int64 (last $sizes)) (int64 $ms.batching.maxBatchSize)) -}}
{{- end -}}
{{- $previous := 0 -}}
{{- range $sizes -}}
{{- if le (int64 .) (int64 $previous) -}}
{{- fail "modelServer.batching.allowedBatchSizes must be strictly increasing" -}}
{{- end -}}
{{- $previous = . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if le (int $ms.terminationGracePeriodSeconds) (add (int $ms.shutdownGraceSeconds) 5) -}}
{{- fail (printf "modelServer.terminationGracePeriodSeconds (%d) must exceed shutdownGraceSeconds + 5 (%d): the server drains requests, then waits up to 5 s for its background tasks" (int $ms.terminationGracePeriodSeconds) (add (int $ms.shutdownGraceSeconds) 5)) -}}
{{- end -}}
{{- end -}}

{{- $sp := $v.streamProcessor -}}
{{- if $sp.enabled -}}
{{- if and (not $ms.enabled) (empty $sp.modelEndpoints) -}}
{{- fail "streamProcessor: modelServer.enabled is false, so set streamProcessor.modelEndpoints to the model server(s) to call" -}}
{{- end -}}
{{- if and (not (kindIs "invalid" $sp.config.model.version)) (not (kindIs "invalid" $sp.config.model.version_label)) -}}
{{- fail "streamProcessor.config.model: give version or version_label, not both" -}}
{{- end -}}
{{- if le (int $sp.terminationGracePeriodSeconds) (int $sp.config.shutdown_grace_seconds) -}}
{{- fail (printf "streamProcessor.terminationGracePeriodSeconds (%d) must exceed config.shutdown_grace_seconds (%d)" (int $sp.terminationGracePeriodSeconds) (int $sp.config.shutdown_grace_seconds)) -}}
{{- end -}}
{{- if gt (int $sp.config.model.backoff_initial_ms) (int $sp.config.model.backoff_max_ms) -}}
{{- fail "streamProcessor.config.model: backoff_initial_ms is above backoff_max_ms" -}}
{{- end -}}
{{- end -}}

{{- $al := $v.alerts -}}
{{- if $al.enabled -}}
{{- $c := $al.config -}}
{{- if le (int $al.terminationGracePeriodSeconds) (int $c.shutdown_grace_seconds) -}}
{{- fail (printf "alerts.terminationGracePeriodSeconds (%d) must exceed config.shutdown_grace_seconds (%d)" (int $al.terminationGracePeriodSeconds) (int $c.shutdown_grace_seconds)) -}}
{{- end -}}
{{- if and $sp.enabled (ne $c.scores_topic $sp.config.scores_topic) -}}
{{- fail (printf "alerts.config.scores_topic %q is not the topic the stream processor writes scores to (streamProcessor.config.scores_topic %q)" $c.scores_topic $sp.config.scores_topic) -}}
{{- end -}}
{{- /* The service refuses alerts_topic or changelog_topic equal to scores_topic; any two alike would mix records the others' readers cannot read. */ -}}
{{- $topics := dict -}}
{{- range $key := list "scores_topic" "alerts_topic" "changelog_topic" "dead_letter_topic" -}}
{{- $topic := index $c $key -}}
{{- if hasKey $topics $topic -}}
{{- fail (printf "alerts.config: %s and %s are both %q; the scores, alerts, changelog and dead-letter topics must differ" (get $topics $topic) $key $topic) -}}
{{- end -}}
{{- $_ := set $topics $topic $key -}}
{{- end -}}
{{- $rules := dict -}}
{{- range $i, $rule := $c.rules -}}
{{- if hasKey $rules $rule.name -}}
{{- fail (printf "alerts.config.rules[%d]: another rule is named %q (the name is part of alert ids)" $i $rule.name) -}}
{{- end -}}
{{- $_ := set $rules $rule.name true -}}
{{- if and (hasKey $rule "advance_seconds") (gt (int64 $rule.advance_seconds) (int64 $rule.window_seconds)) -}}
{{- fail (printf "alerts.config.rules[%d] (%q): advance_seconds (%d) is above window_seconds (%d)" $i $rule.name (int64 $rule.advance_seconds) (int64 $rule.window_seconds)) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "group.id" "enable.auto.commit" "enable.auto.offset.store" "transactional.id" -}}
{{- if hasKey $v.kafka.properties $key -}}
{{- fail (printf "kafka.properties: %q is set by the alerts service (alerts.config.group_id sets the group), which refuses it" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- $in := $v.ingest -}}
{{- if $in.enabled -}}
{{- if le (int $in.terminationGracePeriodSeconds) (int $in.config.shutdown_grace_seconds) -}}
{{- fail (printf "ingest.terminationGracePeriodSeconds (%d) must exceed config.shutdown_grace_seconds (%d)" (int $in.terminationGracePeriodSeconds) (int $in.config.shutdown_grace_seconds)) -}}
{{- end -}}
{{- end -}}

{{- $sim := $v.deviceSimulator -}}
{{- if $sim.enabled -}}
{{- if gt (int $sim.replicas) (int $sim.cars) -}}
{{- fail (printf "deviceSimulator: replicas (%d) is more than cars (%d); a replica without cars has nothing to publish" (int $sim.replicas) (int $sim.cars)) -}}
{{- end -}}
{{- if gt (float64 $sim.faultOnsetMinSeconds) (float64 $sim.faultOnsetMaxSeconds) -}}
{{- fail "deviceSimulator: faultOnsetMinSeconds is after faultOnsetMaxSeconds" -}}
{{- end -}}
{{- end -}}
{{- end -}}
