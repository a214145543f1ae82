// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama renders a chat request: standard input is JSON
// {"template": "...", "messages": [{"role", "content", "tool_calls"}], "tools": [...]}, standard output the prompt.
// The data has Ollama's names (.Messages, .Tools, a message's .ToolCalls, a tool's .Function.Name) and its `json`
// function (Go's encoding of a value). (tests only)
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type function struct {
	Name        string         `json:"name"`
	Description string         `json:"description,omitempty"`
	Parameters  any            `json:"parameters,omitempty"`
	Arguments   map[string]any `json:"arguments,omitempty"`
}

type tool struct {
	Type     string   `json:"type"`
	Function function `json:"function"`
}

type call struct {
	Function function `json:"function"`
}

type message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	ToolCalls []call `json:"tool_calls,omitempty"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
	Tools    []tool    `json:"tools"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("modelfile").Funcs(funcs).Parse(req.Template))
	data := map[string]any{"Messages": req.Messages, "Tools": req.Tools}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
