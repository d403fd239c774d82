{{/*
Ingest's TOML config (services/ingest/src/config.rs, IngestConfig): ingest.config plus what
the chart owns: admin_listen, grpc.listen, the kafka table, mqtt.url (empty without the
bridge), mqtt.tls, mqtt_proxy.listen, users_file and tls, http.listen, token_file and tls.
mqtt.client_id (the pod name) and the credentials come from the environment.
*/}}
{{- define "vigil.ingest.config" -}}
{{- $in := .Values.ingest -}}
{{- $config := deepCopy $in.config -}}
{{- $_ := set $config "admin_listen" (printf "0.0.0.0:%d" (int $in.ports.metrics)) -}}
{{- $_ := set $config.grpc "listen" (ternary (printf "0.0.0.0:%d" (int $in.ports.grpc)) "" $in.grpc.enabled) -}}
{{- $_ := set $config "kafka" (merge (fromYaml (include "vigil.stringMap" $in.kafkaProperties)) (fromYaml (include "vigil.kafka.properties" .))) -}}
{{- $_ := set $config.mqtt "url" (ternary .Values.mqtt.url "" $in.mqttBridge.enabled) -}}
{{- $_ := set $config.mqtt_proxy "listen" (ternary (printf "0.0.0.0:%d" (int $in.ports.mqtt)) "" $in.mqttProxy.enabled) -}}
{{- if and $in.mqttProxy.enabled $in.mqttProxy.usersSecret -}}
{{- $_ := set $config.mqtt_proxy "users_file" (printf "/etc/vigil/ingest-users/%s" $in.mqttProxy.usersKey) -}}
{{- end -}}
{{- $_ := set $config.http "listen" (ternary (printf "0.0.0.0:%d" (int $in.ports.http)) "" $in.http.enabled) -}}
{{- with $in.deviceTls.existingSecret -}}
{{- $tls := dict "cert_file" (printf "/etc/vigil/device-tls/%s" $in.deviceTls.certKey) "key_file" (printf "/etc/vigil/device-tls/%s" $in.deviceTls.keyKey) "client_certificates" $in.deviceTls.clientCertificates -}}
{{- if ne $in.deviceTls.clientCertificates "none" -}}
{{- $_ := set $tls "client_ca_file" (printf "/etc/vigil/device-tls/%s" $in.deviceTls.caKey) -}}
{{- end -}}
{{- if $in.mqttProxy.enabled }}{{ $_ := set $config.mqtt_proxy "tls" $tls }}{{ end -}}
{{- if $in.http.enabled }}{{ $_ := set $config.http "tls" (deepCopy $tls) }}{{ end -}}
{{- end -}}
{{- if and $in.http.enabled $in.http.tokenSecret -}}
{{- $_ := set $config.http "token_file" (printf "/etc/vigil/ingest-token/%s" $in.http.tokenKey) -}}
{{- end -}}
{{- $tls := .Values.mqtt.tls -}}
{{- if $tls.existingSecret -}}
{{- $dir := include "vigil.mqtt.tlsDir" . -}}
{{- $files := dict -}}
{{- with $tls.caKey }}{{ $_ := set $files "ca_file" (printf "%s/%s" $dir .) }}{{ end -}}
{{- with $tls.certKey }}{{ $_ := set $files "client_cert_file" (printf "%s/%s" $dir .) }}{{ end -}}
{{- with $tls.keyKey }}{{ $_ := set $files "client_key_file" (printf "%s/%s" $dir .) }}{{ end -}}
{{- $_ := set $config.mqtt "tls" $files -}}
{{- end -}}
# Vigil ingest (services/ingest/src/config.rs), from the Helm values ingest.config.
# From the environment: INGEST_MQTT__CLIENT_ID (the pod name), INGEST_MQTT__USERNAME,
# INGEST_MQTT__PASSWORD and INGEST_KAFKA__SASL_* (Secrets).
{{- include "vigil.toml.table" (dict "table" $config "path" list) }}
{{- end -}}
