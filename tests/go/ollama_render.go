// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama renders a chat request: standard input is JSON
// {"template": "...", "messages": [{"role": "...", "content": "..."}]}, standard output the prompt. (tests only)
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(req.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": req.Messages}); err != nil {
		panic(err)
	}
}
