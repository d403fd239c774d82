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
