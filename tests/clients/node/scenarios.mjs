// The OpenAI Node SDK against governor gateway: each scenario's outcome, printed as one JSON
// document for tests/clients/test_node_sdk.py to check. Keys and the base URL come from the
// environment (GOVERNOR_BASE_URL, KEY_FREE, KEY_BURST, KEY_HASTY, KEY_SPENT, KEY_METERED).
import OpenAI from 'openai';

const env = process.env;
const messages = [{ role: 'user', content: 'hi' }];
const client = (key, maxRetries = 2) =>
  new OpenAI({ apiKey: key, baseURL: env.GOVERNOR_BASE_URL, maxRetries });
const create = (sdk, body = {}) =>
  sdk.chat.completions.create({ model: 'gpt-3.5-turbo', messages, ...body });

async function outcome(run) {
  try {
    return { ok: await run() };
  } catch (error) {
    return {
      error: {
        name: error.constructor.name,
        status: error.status ?? null,
        code: error.code ?? null,
        type: error.type ?? null,
        param: error.param ?? null,
        message: error.message,
      },
    };
  }
}

const results = {};
results.success = await outcome(async () => {
  const answer = await create(client(env.KEY_FREE)); // no max_tokens, on a 1,000-token day
  return { content: answer.choices[0].message.content, total: answer.usage.total_tokens };
});
results.streaming = await outcome(async () => {
  const stream = await create(client(env.KEY_FREE), { stream: true, max_tokens: 10 });
  let text = '';
  for await (const chunk of stream) {
    text += chunk.choices[0].delta.content ?? ''; // throws on a chunk with no choices
  }
  return { text };
});
results.retried = await outcome(async () => {
  const sdk = client(env.KEY_BURST, 3);
  const served = [];
  for (let i = 0; i < 8; i += 1) {
    served.push(Boolean((await create(sdk, { max_tokens: 5 })).choices[0].message.content));
  }
  return { served };
});
results.rate_limited = await outcome(async () => {
  const sdk = client(env.KEY_HASTY, 0);
  for (let i = 0; i < 8; i += 1) {
    await create(sdk, { max_tokens: 5 });
  }
  return 'never refused';
});
results.spent = await outcome(() => create(client(env.KEY_SPENT, 0)));
results.quota = await outcome(() => create(client(env.KEY_METERED, 2)));
results.forbidden = await outcome(() => create(client(env.KEY_FREE), { model: 'gpt-4' }));

console.log(JSON.stringify(results));
