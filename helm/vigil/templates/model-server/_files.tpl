{{/* modelServer.models with the defaults of left-out fields filled in (TF Serving's: latest 1), as a YAML list. */}}
{{- define "vigil.modelServer.models" -}}
{{- $ms := .Values.modelServer -}}
{{- $models := list -}}
{{- range $ms.models -}}
{{- $model := merge (dict) . (dict "basePath" "" "versionPolicy" "latest" "numVersions" 1 "versions" list "versionLabels" dict) -}}
{{- if not $model.basePath -}}
{{- $_ := set $model "basePath" (printf "%s/%s" (trimSuffix "/" $ms.modelSource.mountPath) $model.name) -}}
{{- end -}}
{{- $models = append $models $model -}}
{{- end -}}
{{- toYaml $models -}}
{{- end -}}

{{/* TF Serving's ModelServerConfig text proto (services/model-server/src/model_config.rs). */}}
{{- define "vigil.modelServer.modelConfig" -}}
{{- $ms := .Values.modelServer -}}
model_config_list {
{{- range (include "vigil.modelServer.models" . | fromYamlArray) }}
  config {
    name: {{ .name | quote }}
    base_path: {{ .basePath | quote }}
    model_platform: "tensorflow"
    {{- if eq .versionPolicy "all" }}
    model_version_policy { all {} }
    {{- else if eq .versionPolicy "latest" }}
    model_version_policy { latest { num_versions: {{ include "vigil.int" .numVersions }} } }
    {{- else }}
    model_version_policy { specific {{ "{" }}{{ range .versions }} versions: {{ include "vigil.int" . }}{{ end }} } }
    {{- end }}
    {{- range $label, $version := .versionLabels }}
    version_labels { key: {{ $label | quote }} value: {{ include "vigil.int" $version }} }
    {{- end }}
  }
{{- end }}
}
{{- end -}}

{{/* TF Serving's BatchingParameters text proto (--batching_parameters_file). */}}
{{- define "vigil.modelServer.batchingConfig" -}}
{{- $b := .Values.modelServer.batching -}}
max_batch_size { value: {{ include "vigil.int" $b.maxBatchSize }} }
batch_timeout_micros { value: {{ include "vigil.int" $b.batchTimeoutMicros }} }
max_enqueued_batches { value: {{ include "vigil.int" $b.maxEnqueuedBatches }} }
{{- if not (kindIs "invalid" $b.numBatchThreads) }}
num_batch_threads { value: {{ include "vigil.int" $b.numBatchThreads }} }
{{- end }}
{{- range $b.allowedBatchSizes }}
allowed_batch_sizes: {{ include "vigil.int" . }}
{{- end }}
{{- end -}}

{{/*
The librdkafka properties of the rollout state's Kafka clients (--rollout_kafka_property), as
YAML (a map). On kafka.brokers (rolloutState.kafka.brokers empty): the security ingest and the
processor use (vigil.kafka.properties: security.protocol, sasl.mechanism, ssl.*.location,
kafka.properties) without bootstrap.servers, which is --rollout_kafka_brokers; the SASL
credentials come from the Secret as environment variables (vigil.kafka.saslEnv). On a listener
of its own: none of those. Then rolloutState.kafka.properties on top. The properties the model
server sets itself (services/model-server/src/config.rs, MANAGED_KAFKA_PROPERTIES) are left
out: the server refuses them, and kafka.properties may well carry linger.ms for the others.
The schema refuses the same list in rolloutState.kafka.properties; tests/helm/check_rendered.py
checks the three agree.
*/}}
{{- define "vigil.modelServer.rolloutKafkaProperties" -}}
{{- $rollout := .Values.modelServer.rolloutState.kafka -}}
{{- $props := dict -}}
{{- if not $rollout.brokers -}}
{{- $props = fromYaml (include "vigil.kafka.properties" .) -}}
{{- end -}}
{{- $props = merge (fromYaml (include "vigil.stringMap" $rollout.properties)) $props -}}
{{- toYaml (omit $props "bootstrap.servers" "group.id" "enable.auto.commit" "enable.partition.eof" "enable.idempotence" "linger.ms") -}}
{{- end -}}
